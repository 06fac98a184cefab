"""The adapters a server offers: every adapter in one folder, by name, loaded on first use and
kept on the model's device within a memory budget (least recently used out first).

A name is a file's stem (`tenant-a` for `tenant-a.safetensors`) or the name of a PEFT
adapter directory (holding `adapter_config.json`). The folder is read again for a name
not yet seen, so adapters copied in while the server runs are served too. An evicted
adapter is only dropped from the pool: a request that already holds it keeps it until
its prefill has made its states.
"""

import sys
import threading
from collections import OrderedDict
from pathlib import Path

from minipara.errors import UserError
from minipara.io.adapters import load_adapter


class AdapterPool:
    def __init__(self, folder, model_args, device, budget_bytes: int, weights_id: str | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.args, self.device, self.budget = model_args, device, budget_bytes
        self.weights_id = weights_id  # the served weights' fingerprint: warn for adapters made on others
        self.loaded: OrderedDict = OrderedDict()  # name -> adapter, least recently used first
        self.lock = threading.Lock()

    def names(self) -> list[str]:
        if self.folder is None:
            return []
        found = {p.stem for p in self.folder.glob("*.safetensors")}
        found |= {p.parent.name for p in self.folder.glob("*/adapter_config.json")}
        return sorted(found)

    def path(self, name: str) -> Path | None:
        if self.folder is None or not name or "/" in name or "\\" in name or name.startswith("."):
            return None
        for p in (self.folder / f"{name}.safetensors", self.folder / name):
            if p.is_file() or (p / "adapter_config.json").is_file():
                return p
        return None

    def get(self, name: str):
        """The adapter called `name`, loaded if need be; KeyError if there is none such, UserError
        if its file cannot be used with this model."""
        with self.lock:
            if name in self.loaded:
                self.loaded.move_to_end(name)
                return self.loaded[name]
            path = self.path(name)
            if path is None:
                raise KeyError(name)
            adapter = load_adapter(path, self.args, self.weights_id).to(self.device).requires_grad_(False)
            size = adapter_bytes(adapter)
            while self.loaded and self.used() + size > self.budget:
                self.loaded.popitem(last=False)
            self.loaded[name] = adapter
            return adapter

    def used(self) -> int:
        return sum(adapter_bytes(a) for a in self.loaded.values())

    def preload(self):
        """Load adapters in name order while they fit the budget (the rest load on demand)."""
        for name in self.names():
            p = self.path(name)
            files = [p] if p.is_file() else list(p.glob("*.safetensors"))
            if self.used() + sum(f.stat().st_size for f in files) > self.budget:
                return
            try:
                self.get(name)
            except UserError as e:  # refused again, with this message, when a request names it
                print(f"minipara: adapter {name!r} not loaded: {e}", file=sys.stderr, flush=True)


def adapter_bytes(adapter) -> int:
    return sum(t.numel() * t.element_size() for t in adapter.state_dict().values())
