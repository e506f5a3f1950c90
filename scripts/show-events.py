"""Print a turn's Server-Sent Events as they arrive, with the time since the
first one; used by scripts/demo."""
import json
import sys
import time

start = None
event = None
for raw in sys.stdin:
    line = raw.rstrip("\n")
    now = time.monotonic()
    start = start or now
    stamp = f"   [{now - start:5.2f}s]"
    if line.startswith(":"):
        print(f"{stamp} (heartbeat)", flush=True)
    elif line.startswith("event:"):
        event = line[6:].strip()
    elif line.startswith("data:"):
        data = json.loads(line[5:])
        if event == "output":
            text = data["chunk"].strip("\n").replace("\n", " | ")
            if text:
                print(f"{stamp} output    {text}", flush=True)
        elif event == "done":
            print(f"{stamp} done      status={data['status']} steps={len(data['steps'])}", flush=True)
        else:
            print(f"{stamp} {event:<9} {json.dumps(data)[:110]}", flush=True)
