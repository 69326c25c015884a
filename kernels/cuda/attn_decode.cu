// attn_decode.cu: see kcuda.h (being written).
