"""The running node: builds the stages from one Settings and starts and stops them in order."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from pacs_node.assembly import Assembly
from pacs_node.catalog.db import Catalog, open_catalog, sqlite_file
from pacs_node.config import PEERS_FILE, Settings
from pacs_node.datadir import make_private
from pacs_node.dispatch.destinations import missing_secrets
from pacs_node.dispatch.dimse import recommitter
from pacs_node.dispatch.outbox import Outbox
from pacs_node.errors import ConfigError
from pacs_node.housekeeping import Housekeeping, finish_purges
from pacs_node.ingest.reconcile import reconcile
from pacs_node.ingest.recorder import CatalogRecorder
from pacs_node.ingest.scp import StorageSCP
from pacs_node.ingest.spool import Spool
from pacs_node.ingest.workers import SCPWorkers
from pacs_node.routing.router import Router, check_models
from pacs_node.worker import WorkerPool

log = logging.getLogger(__name__)


class Node:
    def __init__(self, settings: Settings) -> None:
        options = settings.node
        self.settings = settings
        make_private(options.data_dir, sqlite_file(options.catalog_url))
        self.catalog: Catalog = open_catalog(options.catalog_url)
        self.spool = Spool(
            options.spool_dir, fsync=options.fsync, min_free_bytes=options.min_free_mb * 2**20
        )
        self.recorder = CatalogRecorder(self.catalog, self.spool)
        self.assembly = Assembly(self.catalog, settings)
        self.recorder.add_listener(self.assembly.on_touched)
        check_models(settings)
        self.router = Router(self.catalog, self.spool, settings.routes)
        self.assembly.add_listener(self.router.on_stable)
        for name, env in missing_secrets(settings.destinations):
            source = str((settings.config_dir or Path(".")) / PEERS_FILE)
            raise ConfigError(source, f"destinations.{name}.auth", f"${env} is not set")
        self.workers = WorkerPool(self.catalog, settings)
        self.outbox = Outbox(self.catalog, settings)
        self.housekeeping = Housekeeping(
            self.catalog,
            settings,
            recommit=recommitter(options.ae_title, self.outbox.resolve),
        )
        self.scp: StorageSCP | SCPWorkers
        if options.dicom_workers > 0:
            self.scp = SCPWorkers(
                settings,
                self.recorder,
                options.dicom_workers,
                on_worker_death=lambda since: reconcile(self.spool, self.recorder, since=since),
            )
        else:
            self.scp = StorageSCP(settings, self.spool, self.recorder, self.catalog)
        self._stopped = threading.Event()

    def start(self) -> None:
        """Reconcile the catalog with the spool, rebuild timers, then open the DICOM port."""
        # Removals a crash cut short are finished first, so reconcile never brings them back.
        finish_purges(self.catalog, self.spool.root, self.settings.node.data_dir / "results")
        recovered = reconcile(self.spool, self.recorder)
        self.router.catch_up()
        self.recorder.start()
        self.assembly.start()
        self.workers.start()  # re-queues jobs a dead process left running
        self.outbox.start()  # re-sends deliveries cut off mid-send
        self.housekeeping.start()
        self.scp.start()
        log.info(
            "node started",
            extra={"catalog": self.catalog.url, "recovered_instances": recovered},
        )

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.scp.stop()
        self.recorder.stop()
        self.assembly.stop()
        self.housekeeping.stop()
        self.workers.stop()
        self.outbox.stop()
        self.catalog.dispose()
        log.info("node stopped")

    def wait(self) -> None:
        self._stopped.wait()
