"""A benchmark-case module for tests/test_timing.py (``python -m tests.timing_case --case JSON --case-out F``)."""
import argparse
import json
import os
import sys

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--case")
    p.add_argument("--case-out")
    a = p.parse_args()
    case = json.loads(a.case)
    if case.get("sleep"):
        import time

        time.sleep(case["sleep"])  # a long case: the test stops the parent meanwhile
    if case["value"] < 0:
        print("boom: negative value", file=sys.stderr)
        sys.exit(3)
    with open(a.case_out, "w") as f:
        json.dump({**case, "double": 2 * case["value"], "pid": os.getpid(), "parent": os.getppid()}, f)
