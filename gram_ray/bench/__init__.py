"""Every `gram-ray bench ...`: one module a command (volume, decode, shuffle, data, preprocess, search, train,
fsdp), each building its own table; what they share is in common.py. Side-by-side measurements in one run, never
timed tests. Nothing outside this package and the CLI imports it."""
