"""The dense CLIP family: the last-block attention modes (NACLIP, SCLIP, ClearCLIP, MaskCLIP,
vanilla), the whole-image / sliding-window forward, post-processing, PAMR and JBU."""
