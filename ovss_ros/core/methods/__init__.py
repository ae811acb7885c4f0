"""The method families, one folder each (dense, dslo, freecp, pnp_ovss, deop).

Nothing is imported here: a family (and its heavy libraries) is imported when it is used."""
