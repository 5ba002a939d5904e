"""What every step stands on: configs, errors, atomic I/O, the console, the runtime, metrics, the run folder, the
resume checkpoint, picture sheets and the hook registry of optional steps. Imports nothing else of the package."""
