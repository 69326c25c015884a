// attn_prefill.cu: see kcuda.h (being written).
