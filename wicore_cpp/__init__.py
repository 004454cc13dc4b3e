"""WiCore: an OpenAI-compatible server for GGUF models over llama.cpp."""

__version__ = "1.0.0"
ENGINE_NAME = "wicore-cpp"
