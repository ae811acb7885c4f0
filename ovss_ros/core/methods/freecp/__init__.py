"""FreeCP (ICCV 2025): class purification of the dense maps, with its crop classifier."""
