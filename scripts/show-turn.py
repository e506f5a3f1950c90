"""Print a chat-turn result (docs/design.md §3) readably; used by scripts/demo."""
import json
import sys

r = json.load(sys.stdin)
for step in r.get("steps", []):
    print(f"   $ {step['command']}")
    for line in step.get("output", "").rstrip("\n").splitlines():
        print(f"     {line}")
    code = step.get("exit_code")
    extra = " (still running)" if step.get("still_running") else ""
    print(f"     [exit {code if code is not None else '-'}, {step.get('duration_ms')} ms{extra}]")
t = r.get("timings", {})
print(f"   status={r.get('status')} machine={r.get('machine_id')} wake_ms={t.get('wake_ms')} total_ms={t.get('total_ms')}")
if r.get("usage", {}).get("llm_calls"):
    print(f"   reply: {r.get('reply')}")
