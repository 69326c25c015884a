// act.cu: see kcuda.h (being written).
