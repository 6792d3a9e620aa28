"""Reading torch.distributed.checkpoint (DCP) metadata without letting a checkpoint run code.

DCP's .metadata file is a pickle, which can name any callable, and DCP unpickles it unrestricted. This reader
admits only the record types DCP writes (plus torch dtypes), so loading a checkpoint from elsewhere cannot
execute anything; tensor data is then read by DCP as usual. A reader parses .metadata once and can be handed
metadata parsed before, so a process reads it once however many loads it runs.
"""

from __future__ import annotations

import os
import pickle

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata

_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if dtype or name in _METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


class SafeFileSystemReader(dcp.FileSystemReader):
    """FileSystemReader whose .metadata unpickling admits only DCP's own records.

    `metadata`: the checkpoint's .metadata as an earlier read of it returned (the file is then not read
    again); otherwise the first `read_metadata` reads it and later calls reuse it.
    """

    def __init__(self, path: str | os.PathLike, metadata: Metadata | None = None) -> None:
        super().__init__(path)
        self.metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self.metadata is None:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = dcp.metadata.StorageMeta()
            self.metadata = metadata
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata
