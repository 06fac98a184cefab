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
        self.added: dict[str, Path] = {}  # name -> file, added at run time (POST /v1/load_lora_adapter)
        self.removed: set[str] = set()  # folder names unloaded at run time
        self.lock = threading.RLock()

    def names(self) -> list[str]:
        found = set(self.added)
        if self.folder is not None:
            found |= {p.stem for p in self.folder.glob("*.safetensors") if p.is_file()}
            found |= {p.parent.name for p in self.folder.glob("*/adapter_config.json") if p.is_file()}
        return sorted(found - self.removed)

    def path(self, name: str) -> Path | None:
        if name in self.added:
            return self.added[name]
        if self.folder is None or name in self.removed or not name or "/" in name or "\\" in name:
            return None
        if name.startswith(".") or "\0" in name:
            return None
        try:  # a name too long for a file name (OSError) is no adapter's
            for p in (self.folder / f"{name}.safetensors", self.folder / name):
                if p.is_file() or (p / "adapter_config.json").is_file():
                    return p
        except (OSError, ValueError):
            pass
        return None

    def get(self, name: str):
        """The adapter called `name`, loaded if need be; KeyError if there is none such, UserError
        if its file cannot be used with this model (the message names the adapter, not the
        server's files: it goes to clients; the full one goes to the server's log)."""
        with self.lock:
            if name in self.loaded:
                self.loaded.move_to_end(name)
                return self.loaded[name]
            path = self.path(name)
            if path is None:
                raise KeyError(name)
            try:
                adapter = load_adapter(path, self.args, self.weights_id).to(self.device).requires_grad_(False)
            except UserError as e:
                print(f"minipara: adapter {name!r} refused: {e}", file=sys.stderr, flush=True)
                raise UserError(f"adapter {name!r} cannot be used: {self.hide(str(e), path, name)}") from None
            size = adapter_bytes(adapter)
            while self.loaded and self.used() + size > self.budget:
                self.loaded.popitem(last=False)
            self.loaded[name] = adapter
            return adapter

    def hide(self, message: str, path: Path, name: str) -> str:
        """`message` with the server's paths replaced by the adapter's name."""
        for p in sorted({str(path.resolve()), str(path), str(path.parent.resolve()), str(path.parent)}, key=len)[::-1]:
            message = message.replace(p, name if p.endswith(path.name) else "the adapter folder")
        return message

    def add(self, name: str, path: str | None = None):
        """Serve `name` from now on (from `path`, else the folder), loaded now so a bad file is
        refused at once; a UserError if it cannot be."""
        if not name or any(c in name for c in "/\\\0") or name.startswith("."):
            raise UserError(f"{name!r} is not an adapter name: no slashes, not starting with a dot")
        with self.lock:
            self.removed.discard(name)
            old = self.added.pop(name, None)
            self.loaded.pop(name, None)
            if path is not None:
                self.added[name] = Path(path)
            try:
                self.get(name)
            except KeyError:
                raise UserError(f"no adapter {name!r} in the adapter folder") from None
            except UserError:
                if path is not None:
                    self.added.pop(name)
                if old is not None:
                    self.added[name] = old
                raise

    def remove(self, name: str) -> bool:
        """Stop serving `name` (False if it was not served); requests holding it finish with it."""
        with self.lock:
            if name not in self.names():
                return False
            self.loaded.pop(name, None)
            if self.added.pop(name, None) is None:
                self.removed.add(name)
            return True

    def used(self) -> int:
        return sum(adapter_bytes(a) for a in self.loaded.values())

    def preload(self):
        """Load adapters in name order while they fit the budget (the rest load on demand). One
        that cannot be used is reported and skipped: it is refused again when a request names it."""
        for name in self.names():
            p = self.path(name)
            if p is None:
                continue
            try:
                files = [p] if p.is_file() else list(p.glob("*.safetensors"))
                if self.used() + sum(f.stat().st_size for f in files) > self.budget:
                    return
                self.get(name)
            except UserError:
                pass  # get() has reported it
            except OSError as e:
                print(f"minipara: adapter {name!r} not loaded: {e}", file=sys.stderr, flush=True)


def adapter_bytes(adapter) -> int:
    return sum(t.numel() * t.element_size() for t in adapter.state_dict().values())
