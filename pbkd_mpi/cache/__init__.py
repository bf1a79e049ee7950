"""The activation cache: its layout on disk, building it, reading it, its run stage."""
