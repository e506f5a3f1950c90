"""Summarise the CloudWatch EMF metric lines in a log (the functions' stdout
under `cargo lambda watch`); used by scripts/demo. Exits non-zero unless
chat-turn, provision and sleep-sweep each emitted at least one line and
every line has the `_aws` metadata with its metrics as numbers."""
import json
import sys

lines = []
with open(sys.argv[1], errors="replace") as log:
    for raw in log:
        start = raw.find('{"')
        if start < 0 or '"_aws"' not in raw:
            continue
        try:
            doc = json.loads(raw[start:])
        except ValueError:
            continue
        if isinstance(doc, dict) and "_aws" in doc:
            lines.append(doc)

ok = True
for doc in lines:
    for directive in doc["_aws"]["CloudWatchMetrics"]:
        for m in directive["Metrics"]:
            if not isinstance(doc.get(m["Name"]), (int, float)):
                print(f"   ✗ {doc.get('Function')}: {m['Name']} is not a number")
                ok = False
        for dims in directive["Dimensions"]:
            for d in dims:
                if not isinstance(doc.get(d), str):
                    print(f"   ✗ {doc.get('Function')}: dimension {d} is not a string")
                    ok = False

turns = [d for d in lines if d.get("Function") == "chat-turn"]
for d in turns:
    wake = f" wake {d['wake_ms']} ms," if "wake_ms" in d else ""
    print(f"   turn      {d.get('user_id', '?'):6} {d.get('Outcome', '?'):12} {d.get('turn_total_ms')} ms,"
          f"{wake} {d.get('steps')} steps, {d.get('dedalus_requests')} Dedalus requests, {d.get('table_calls')} table calls")
for d in lines:
    if d.get("Function") == "provision":
        print(f"   provision {d.get('user_id', '?'):6} {d.get('Outcome', '?'):12} {d.get('provision_total_ms')} ms"
              f" (boot {d.get('boot_ms', '-')} ms, bootstrap {d.get('bootstrap_ms', '-')} ms,"
              f" attempt {d.get('attempts', '-')})")
    elif d.get("Function") == "sleep-sweep":
        print(f"   sweep     slept {d.get('slept')} of {d.get('candidates')} idle candidates in {d.get('duration_ms')} ms")

functions = {d.get("Function") for d in lines}
missing = {"chat-turn", "provision", "sleep-sweep"} - functions
if missing:
    print(f"   ✗ no metric line from {', '.join(sorted(missing))}")
    ok = False
sys.exit(0 if ok else 1)
