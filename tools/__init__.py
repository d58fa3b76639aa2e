"""Tools around the library: the DTM-vs-token-wise study, its pictures and the spatial-consistency analysis."""
