"""One report module per study."""
