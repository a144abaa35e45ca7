#!/bin/bash
# The image's HEALTHCHECK. The runtime image has no curl and `callboard`
# has no subcommand that makes an HTTP request, so this speaks HTTP/1.0
# to GET /healthz over bash's /dev/tcp (exit 0 on a 200).
#
# `callboard project` serves no HTTP at all (ADR 0007: its health is read
# through any API process's /projectorz, or from its exit): for it, and for
# the one-shot commands, the check passes while the process lives.
set -u
cmdline=$(tr '\0' ' ' </proc/1/cmdline 2>/dev/null || true)
case " $cmdline " in
  *" serve "* | *" run "*) ;;
  *) exit 0 ;;
esac
addr=${CALLBOARD_HTTP_ADDR:-0.0.0.0:8006}
port=${addr##*:}
host=${addr%:*}
case "$host" in "" | "0.0.0.0" | "[::]" | "::") host=127.0.0.1 ;; esac
host=${host#[}
host=${host%]}
exec 3<>"/dev/tcp/$host/$port" || exit 1
printf 'GET /healthz HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n\r\n' "$host" >&3
IFS= read -r -t 3 status <&3 || exit 1
exec 3<&- 3>&-
case "$status" in
  "HTTP/1."[01]" 200"*) exit 0 ;;
  *) echo "GET /healthz: ${status:-no answer}" >&2; exit 1 ;;
esac
