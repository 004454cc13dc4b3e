"""`wicore quantize`: llama.cpp's quantizer, made safe (see `command`).

command     the subcommand: checks before any work, then quantize, publish, --check
plan        which type each tensor gets, and the output size, before any work
formats     the quantization types llama.cpp offers, and ggml's block layouts
child       runs llama.cpp's quantizer (and --check) in a child process
log_events  llama.cpp's quantizer log, parsed into progress events
check       --check: next-token distributions of both models compared
console     everything the command shows its user
"""
