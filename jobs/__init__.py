"""
Running long jobs safely: one run per output folder, interrupts that end in one line, and the hook the
fault-injection tests use to interrupt a tool at its dangerous moments.

- `lock.py`: [`DashengOutputLock`], a lock file (process id and host) that makes a run the only owner of a folder.
- `interrupts.py`: SIGINT, SIGTERM and SIGHUP as one exception ([`DashengInterrupted`]), sections that finish before
  an interrupt takes effect, and `fault_point`, where a tool announces (and pauses at) a dangerous moment for tests.

May import: the standard library only.
"""
