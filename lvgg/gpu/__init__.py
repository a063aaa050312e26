"""The experts on the GPU: the CUDA bridge to the CPU engine (``bridge``), Triton dequantization of
every GGUF type and of lvgg's packed layout (``dequant``), experts streamed for long passes or kept
resident (``experts``), and the CPU/GPU split of decode steps (``split``)."""
