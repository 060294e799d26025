#!/usr/bin/env bash
# The README's test command: set up (apt + pip), lint, run every test. The steps live in .ci/run
# so that CI and this command can never drift apart.
#   scripts/test.sh                 everything
#   scripts/test.sh -m "not slow"   the fast half
exec bash "$(dirname "$0")/../.ci/run" "$@"
