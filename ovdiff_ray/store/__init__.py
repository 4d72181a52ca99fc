"""Bank storage: filesystem factory (fs), schema/manifest (schema), shards + commits (shards), in-memory bank (bank)."""
from .bank import Bank, BankArrays
from .fs import CommitConflict, Location, StorageConfig, StoreError
from .schema import ManifestError
from .shards import ShardError, ShardInfo, commit_manifest, load_bank, new_manifest, read_manifest, write_shard

__all__ = ["Bank", "BankArrays", "CommitConflict", "Location", "StorageConfig", "StoreError", "ManifestError",
           "ShardError", "ShardInfo", "commit_manifest", "load_bank", "new_manifest", "read_manifest", "write_shard"]
