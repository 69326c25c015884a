// rope.cu: see kcuda.h (being written).
