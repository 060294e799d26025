"""Last step before a sandboxed program runs: drop privileges, set limits, exec.

Started by ``evaluation.sandbox`` as ``python _jail.py SPEC_JSON ARGV...``, usually already inside
fresh network and PID namespaces (``unshare``). It must use the standard library only and must not
import the ``evaluation`` package: it runs with ``-I -S`` so nothing from the caller's environment
leaks in.
"""

import json
import os
import resource
import sys


def main() -> None:
    spec = json.loads(sys.argv[1])
    argv = sys.argv[2:]
    uid = spec.get("uid")
    if uid is not None and os.geteuid() == 0:
        # Root ignores RLIMIT_NPROC, so a fork bomb is only contained once we are someone else.
        os.setgroups([])
        os.setgid(spec.get("gid", uid))
        os.setuid(uid)
    os.umask(0o077)
    for name, value in spec["limits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    # argv[0] is an absolute path (resolved by the caller): after setuid the interpreter may no
    # longer read its own standard library, so nothing here may import lazily.
    os.execve(argv[0], argv, spec["env"])


if __name__ == "__main__":
    main()
