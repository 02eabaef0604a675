"""Forward-hook probes: gate and direction statistics computed on the device, streamed to sinks."""
