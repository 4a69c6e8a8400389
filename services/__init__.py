"""The four deployable services; each folder is one service (imported as splitserve.services.<name>)."""
