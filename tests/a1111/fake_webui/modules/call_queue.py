"""modules.call_queue (A1111 v1.10): the lock every generation holds (a FIFOLock: not re-entrant)."""

import threading

queue_lock = threading.Lock()
