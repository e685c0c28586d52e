"""Data: file formats (``formats``); dataset sources, the procedural world and mixing follow."""
