// The upload page: folders and zips of DICOM files, sent to the node's STOW-RS in batches.
// A zip is read in the browser (central directory, stored or deflated entries through
// DecompressionStream("deflate-raw")); no library, nothing fetched at run time.
"use strict";

(() => {
  const STOW_URL = "/dicomweb/studies";
  const BATCH_FILES = 16;
  const BATCH_BYTES = 32 * 1024 * 1024;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const drop = document.getElementById("drop");
  const rows = document.querySelector("#results tbody");
  const progress = document.getElementById("progress");
  const summary = document.getElementById("summary");
  const counts = { stored: 0, failed: 0, skipped: 0 };

  const REASONS = {
    0xa700: "refused: out of resources or larger than the node takes",
    0xa710: "refused for now: the study is being removed, send it again later",
    0xa900: "the data set does not match its file meta or the study",
    0xc000: "cannot understand", 0xc001: "unreadable data set",
    0xc002: "a required UID is missing", 0xc003: "a UID is invalid",
    0xc010: "identity conflict with a study the node holds",
    0xc011: "re-sent with other bytes (refused by the resend policy)",
    0x0110: "processing failure",
  };

  function row(name, kind, detail) {
    const tr = document.createElement("tr");
    for (const [text, cls] of [[name, ""], [kind, kind], [detail, ""]]) {
      const td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      tr.appendChild(td);
    }
    rows.appendChild(tr);
    return tr;
  }

  function settle(tr, kind, detail) {
    tr.cells[1].textContent = kind;
    tr.cells[1].className = kind;
    tr.cells[2].textContent = detail;
    counts[kind] += 1;
    summary.textContent = `${counts.stored} stored, ${counts.failed} failed, ${counts.skipped} skipped`;
  }

  // -- where files come from ---------------------------------------------------------------

  function readEntries(reader) {
    return new Promise((resolve, reject) => reader.readEntries(resolve, reject));
  }

  async function walk(entry, prefix, out) {
    if (entry.isFile) {
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      out.push({ name: prefix + entry.name, open: async () => file, size: file.size });
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (let batch = await readEntries(reader); batch.length; batch = await readEntries(reader)) {
        for (const child of batch) await walk(child, `${prefix}${entry.name}/`, out);
      }
    }
  }

  async function dropped(dataTransfer) {
    const out = [];
    const entries = [...dataTransfer.items]
      .map((item) => (item.webkitGetAsEntry ? item.webkitGetAsEntry() : null))
      .filter(Boolean);
    if (entries.length) {
      for (const entry of entries) await walk(entry, "", out);
    } else {
      for (const file of dataTransfer.files) out.push(fromFile(file));
    }
    return out;
  }

  function fromFile(file) {
    return { name: file.webkitRelativePath || file.name, open: async () => file, size: file.size };
  }

  // -- zip (PKWARE APPNOTE 4.3: end of central directory, central directory, local headers) --

  async function unzip(name, blob) {
    const tailStart = Math.max(0, blob.size - 65557);
    const tail = new DataView(await blob.slice(tailStart).arrayBuffer());
    let eocd = -1;
    for (let i = tail.byteLength - 22; i >= 0; i -= 1) {
      if (tail.getUint32(i, true) === 0x06054b50) { eocd = i; break; }
    }
    if (eocd < 0) throw new Error("not a zip file");
    const count = tail.getUint16(eocd + 10, true);
    const cdSize = tail.getUint32(eocd + 12, true);
    const cdOffset = tail.getUint32(eocd + 16, true);
    if (count === 0xffff || cdOffset === 0xffffffff) throw new Error("ZIP64 is not supported");
    const cd = new DataView(await blob.slice(cdOffset, cdOffset + cdSize).arrayBuffer());
    const decoder = new TextDecoder();
    const out = [];
    for (let p = 0, n = 0; n < count; n += 1) {
      if (cd.getUint32(p, true) !== 0x02014b50) throw new Error("broken central directory");
      const flags = cd.getUint16(p + 8, true);
      const method = cd.getUint16(p + 10, true);
      const packed = cd.getUint32(p + 20, true);
      const size = cd.getUint32(p + 24, true);
      const nameLength = cd.getUint16(p + 28, true);
      const extraLength = cd.getUint16(p + 30, true);
      const commentLength = cd.getUint16(p + 32, true);
      const local = cd.getUint32(p + 42, true);
      const entryName = decoder.decode(new Uint8Array(cd.buffer, p + 46, nameLength));
      p += 46 + nameLength + extraLength + commentLength;
      if (entryName.endsWith("/")) continue;
      const shown = `${name}/${entryName}`;
      if (flags & 1) { out.push({ name: shown, skip: "encrypted zip entry" }); continue; }
      if (method !== 0 && method !== 8) { out.push({ name: shown, skip: `zip method ${method}` }); continue; }
      const open = async () => {
        const header = new DataView(await blob.slice(local, local + 30).arrayBuffer());
        const start = local + 30 + header.getUint16(26, true) + header.getUint16(28, true);
        const data = blob.slice(start, start + packed);
        if (method === 0) return data;
        const inflated = data.stream().pipeThrough(new DecompressionStream("deflate-raw"));
        return new Response(inflated).blob();
      };
      out.push({ name: shown, open, size });
    }
    return out;
  }

  // -- DICOM Part 10 or not: the preamble, DICM and the SOP Instance UID of the file meta ------

  const LONG_VRS = new Set(["OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"]);

  async function sniff(blob) {
    const head = new DataView(await blob.slice(0, 8192).arrayBuffer());
    const magic = (at) => at + 4 <= head.byteLength &&
      String.fromCharCode(...new Uint8Array(head.buffer, at, 4)) === "DICM";
    let p = magic(128) ? 132 : magic(0) ? 4 : -1;
    if (p < 0) return null;
    const meta = {};
    while (p + 8 <= head.byteLength && head.getUint16(p, true) === 0x0002) {
      const element = head.getUint16(p + 2, true);
      const vr = String.fromCharCode(head.getUint8(p + 4), head.getUint8(p + 5));
      let length;
      if (LONG_VRS.has(vr)) { length = head.getUint32(p + 8, true); p += 12; } else { length = head.getUint16(p + 6, true); p += 8; }
      if (p + length > head.byteLength) break;
      if (element === 0x0002 || element === 0x0003) {
        const text = String.fromCharCode(...new Uint8Array(head.buffer, p, length));
        meta[element === 0x0002 ? "sopClass" : "sopInstance"] = text.replace(/[\0 ]+$/, "");
      }
      p += length;
    }
    return meta;
  }

  // -- STOW-RS --------------------------------------------------------------------------------

  function post(parts, onProgress) {
    const boundary = `pacs-node-${crypto.randomUUID()}`;
    const pieces = [];
    for (const part of parts) {
      pieces.push(`\r\n--${boundary}\r\nContent-Type: application/dicom\r\n\r\n`, part.blob);
    }
    pieces.push(`\r\n--${boundary}--\r\n`);
    const body = new Blob(pieces);
    return new Promise((resolve) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", STOW_URL);
      xhr.setRequestHeader("Content-Type", `multipart/related; type="application/dicom"; boundary=${boundary}`);
      xhr.setRequestHeader("Accept", "application/dicom+json");
      xhr.setRequestHeader("X-CSRF-Token", csrf);
      xhr.upload.onprogress = (event) => onProgress(Math.min(event.loaded, body.size) / body.size);
      xhr.onload = () => {
        let json = null;
        try { json = JSON.parse(xhr.responseText); } catch (_) { json = null; }
        resolve({ status: xhr.status, json });
      };
      xhr.onerror = () => resolve({ status: 0, json: null });
      xhr.send(body);
    });
  }

  function items(json, tag) {
    return (json && json[tag] && json[tag].Value) || [];
  }

  function first(item, tag) {
    return item[tag] && item[tag].Value ? item[tag].Value[0] : undefined;
  }

  function hex(code) {
    return `0x${Number(code).toString(16).toUpperCase().padStart(4, "0")}`;
  }

  function answer(batch, response) {
    // A batch may hold the same instance twice (a CD's copies): each UID names a list of parts.
    const byUid = new Map();
    for (const part of batch) {
      const uid = part.meta.sopInstance;
      if (!byUid.has(uid)) byUid.set(uid, []);
      byUid.get(uid).push(part);
    }
    const answered = new Set();
    const verdicts = new Map(); // UID -> [state, detail] of its last answer, for copies unnamed
    const next = (uid) => (byUid.get(uid) || []).find((part) => !answered.has(part));
    const mark = (uid, part, state, detail) => {
      answered.add(part);
      verdicts.set(uid, [state, detail]);
      settle(part.tr, state, detail);
    };
    for (const item of items(response.json, "00081199")) {
      const uid = first(item, "00081155");
      const part = next(uid);
      if (!part) continue;
      const warning = first(item, "00081196");
      mark(uid, part, "stored", warning === undefined ? "" : `warning ${hex(warning)}`);
    }
    const unnamed = [];
    for (const item of items(response.json, "00081198")) {
      const code = first(item, "00081197");
      const uid = first(item, "00081155");
      const part = next(uid);
      const detail = `${hex(code)} ${REASONS[code] || REASONS[code & 0xff00] || ""}`.trim();
      if (part) mark(uid, part, "failed", detail); else unnamed.push(detail);
    }
    for (const part of batch) {
      if (answered.has(part)) continue;
      const verdict = verdicts.get(part.meta.sopInstance);
      if (verdict) { settle(part.tr, ...verdict); continue; }
      const why = response.json && response.json.detail ? response.json.detail
        : unnamed.shift() || (response.status ? `HTTP ${response.status}` : "network error");
      settle(part.tr, "failed", why);
    }
  }

  async function upload(found) {
    progress.value = 0;
    const files = [];
    for (const item of found) {
      if (/\.zip$/i.test(item.name)) {
        try {
          files.push(...(await unzip(item.name, await item.open())));
        } catch (error) {
          settle(row(item.name, "", ""), "failed", `zip: ${error.message}`);
        }
      } else files.push(item);
    }
    const total = files.reduce((sum, file) => sum + (file.size || 0), 0) || 1;
    let done = 0;
    let batch = [];
    let bytes = 0;
    const flush = async () => {
      if (!batch.length) return;
      const size = bytes;
      const response = await post(batch, (fraction) => { progress.value = (done + fraction * size) / total; });
      done += size;
      progress.value = done / total;
      answer(batch, response);
      batch = [];
      bytes = 0;
    };
    for (const file of files) {
      const tr = row(file.name, "", "waiting");
      if (file.skip) { settle(tr, "skipped", file.skip); done += file.size || 0; continue; }
      const base = file.name.split("/").pop().toUpperCase();
      const blob = await file.open();
      const meta = base === "DICOMDIR" ? null : await sniff(blob);
      if (!meta) {
        settle(tr, "skipped", base === "DICOMDIR" ? "DICOMDIR (the media's index)" : "not a DICOM file");
        done += file.size || 0;
        progress.value = done / total;
        continue;
      }
      batch.push({ blob, meta, tr });
      bytes += blob.size;
      if (batch.length >= BATCH_FILES || bytes >= BATCH_BYTES) await flush();
    }
    await flush();
    progress.value = 1;
    summary.textContent += " — done";
  }

  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", async (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    upload(await dropped(event.dataTransfer));
  });
  for (const id of ["pick-folder", "pick-files"]) {
    const input = document.getElementById(id);
    input.addEventListener("change", () => {
      upload([...input.files].map(fromFile));
      input.value = "";
    });
  }
})();
