"""The database, the repository of writes, the blob store and the naming of keys and ids."""
