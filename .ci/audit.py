"""`make audit`: known vulnerabilities in the locked packages, by pip-audit and its online database.

Fails on any known vulnerability (known-exploited ones included: no finding passes unless listed in
IGNORED with the reason it does not apply). Never passes by skipping: pip-audit says "No known
vulnerabilities found" even when it could look none of the packages up, so every package must have
been audited. When the database cannot be reached at all, the audit fails saying so, or, with
AUDIT_OFFLINE_OK=1 (.ci/run), warns and exits 0: a machine without that network cannot audit.

Usage: python .ci/audit.py LOCK [LOCK ...]
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

IGNORED: dict[str, str] = {}         # vulnerability id -> why it does not apply here (none today)
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def pins(locks: list[str]) -> list[str]:
    """name==version of every locked package; a local label (torch 2.13.0+cpu) audits as its release."""
    found = {}
    for lock in locks:
        for line in Path(lock).read_text().splitlines():
            match = PIN.match(line)
            if match:
                found[match.group(1).lower()] = match.group(2).split("+")[0]
    return [f"{name}=={version}" for name, version in sorted(found.items())]


def run_pip_audit(requirements: list[str]) -> tuple[dict | None, str]:
    with tempfile.TemporaryDirectory() as tmp:
        pinned, report = Path(tmp, "pinned.txt"), Path(tmp, "report.json")
        pinned.write_text("\n".join(requirements) + "\n")
        command = [sys.executable, "-m", "pip_audit", "--disable-pip", "--no-deps", "--progress-spinner", "off",
                   "--format", "json", "--output", str(report), "--requirement", str(pinned)]
        for vulnerability in IGNORED:
            command += ["--ignore-vuln", vulnerability]
        done = subprocess.run(command, capture_output=True, text=True)
        text = report.read_text() if report.exists() else ""
    return (json.loads(text) if text.strip() else None), done.stderr


def main(locks: list[str]) -> int:
    requirements = pins(locks)
    report, errors = run_pip_audit(requirements)
    offline_ok = os.environ.get("AUDIT_OFFLINE_OK") == "1"
    dependencies = report["dependencies"] if report else []
    skipped = [d for d in dependencies if "skip_reason" in d]
    findings = [(d["name"], d["version"], v) for d in dependencies for v in d.get("vulns", [])]
    for name, version, vuln in findings:
        aliases = ", ".join(vuln.get("aliases", []))
        fixes = ", ".join(vuln.get("fix_versions", [])) or "none yet"
        print(f"audit: {name} {version}: {vuln['id']} ({aliases}); fixed in: {fixes}")
    if findings:
        print(f"audit: FAILED: {len(findings)} known vulnerabilities in {len(requirements)} locked packages")
        return 1
    if report is None or len(skipped) == len(dependencies):
        reason = skipped[0]["skip_reason"] if skipped else (errors.strip().splitlines() or ["no report"])[-1]
        print(f"audit: could not run: pip-audit's vulnerability database was not reachable from this machine "
              f"(none of {len(requirements)} locked packages could be looked up; first reason: {reason})")
        if offline_ok:
            print("audit: skipped (AUDIT_OFFLINE_OK=1); run `make audit` on a machine with that network")
            return 0
        return 1
    if skipped:
        for dependency in skipped:
            print(f"audit: not audited: {dependency['skip_reason']}")
        print(f"audit: FAILED: {len(skipped)} of {len(dependencies)} locked packages could not be audited")
        return 1
    print(f"audit: {len(dependencies)} locked packages, no known vulnerabilities")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
