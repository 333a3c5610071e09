// The result viewer: the source slice (windowed by the server) with the segmentation over it
// (one RGBA PNG of the segments left on), composited on a canvas at the chosen opacity.
// Mouse wheel, the slider or the arrow keys page through the slices.
"use strict";
(function () {
  const root = document.getElementById("viewer");
  if (!root) return;
  const canvas = document.getElementById("view");
  const context = canvas.getContext("2d");
  const slider = document.getElementById("slice");
  const opacity = document.getElementById("opacity");
  const sliceLabel = document.getElementById("slice-label");
  const windowLabel = document.getElementById("window-label");
  const boxes = Array.from(document.querySelectorAll("input.segment"));
  const base = root.dataset.base;
  const slices = Number(root.dataset.slices);
  const series = root.dataset.series ? `&series=${encodeURIComponent(root.dataset.series)}` : "";
  const state = {
    index: Number(slider.value),
    wc: Number(root.dataset.wc),
    ww: Number(root.dataset.ww),
  };
  const images = new Map(); // URL -> loaded Image (a small cache of recent ones)
  const CACHE = 64;
  let drawing = 0;

  // Square pixels on screen whatever the pixel spacing: the canvas keeps the physical aspect.
  const width = Number(root.dataset.columns) * Number(root.dataset.columnSpacing);
  const height = Number(root.dataset.rows) * Number(root.dataset.rowSpacing);
  canvas.style.aspectRatio = `${width} / ${height}`;

  function load(url) {
    const known = images.get(url);
    if (known) return Promise.resolve(known);
    return new Promise((resolve, reject) => {
      const image = new Image();
      image.onload = () => {
        images.set(url, image);
        if (images.size > CACHE) images.delete(images.keys().next().value);
        resolve(image);
      };
      image.onerror = () => reject(new Error(`could not load ${url}`));
      image.src = url;
    });
  }

  function shownSegments() {
    return boxes.filter((box) => box.checked).map((box) => box.value);
  }

  async function draw() {
    const ticket = ++drawing;
    const shown = shownSegments();
    const sliceUrl = `${base}/slices/${state.index}.png?wc=${state.wc}&ww=${state.ww}${series}`;
    const labelUrl = shown.length
      ? `${base}/labels/${state.index}.png?segments=${shown.join(",")}${series}`
      : null;
    const [slice, labels] = await Promise.all([load(sliceUrl), labelUrl ? load(labelUrl) : null]);
    if (ticket !== drawing) return; // a newer request will draw
    context.globalAlpha = 1;
    context.drawImage(slice, 0, 0, canvas.width, canvas.height);
    if (labels) {
      context.globalAlpha = Number(opacity.value) / 100;
      context.drawImage(labels, 0, 0, canvas.width, canvas.height);
      context.globalAlpha = 1;
    }
    sliceLabel.textContent = `${state.index + 1} / ${slices}`;
    windowLabel.textContent = `W ${Math.round(state.ww)} L ${Math.round(state.wc)}`;
    canvas.dataset.drawn = `${state.index}|${state.wc}|${state.ww}|${shown.join(",")}|${opacity.value}`;
  }

  function go(index) {
    const next = Math.max(0, Math.min(slices - 1, index));
    if (next === state.index) return;
    state.index = next;
    slider.value = String(next);
    draw();
  }

  slider.addEventListener("input", () => go(Number(slider.value)));
  opacity.addEventListener("input", draw);
  boxes.forEach((box) => box.addEventListener("change", draw));
  document.querySelectorAll("button.preset").forEach((button) =>
    button.addEventListener("click", () => {
      state.wc = Number(button.dataset.wc);
      state.ww = Number(button.dataset.ww);
      draw();
    })
  );
  canvas.addEventListener(
    "wheel",
    (event) => {
      event.preventDefault();
      go(state.index + (event.deltaY > 0 ? 1 : -1));
    },
    { passive: false }
  );
  document.addEventListener("keydown", (event) => {
    if (event.target instanceof HTMLInputElement && event.target.type !== "range") return;
    const step = { ArrowUp: -1, ArrowLeft: -1, PageUp: -5, ArrowDown: 1, ArrowRight: 1, PageDown: 5 }[event.key];
    if (step === undefined) return;
    event.preventDefault();
    go(state.index + step);
  });
  draw();
})();
