#!/bin/sh
# Run a command with CAP_NET_ADMIN as an ambient capability when the container was given that capability
# (`docker run --cap-add NET_ADMIN --device /dev/net/tun`: pools with a WireGuard overlay), else run it as it is.
# Why ambient: `ip` (iproute2) drops file capabilities for non-root callers that lack CAP_NET_ADMIN in their
# inheritable set, so the overlay's tools (ip, wg, wireguard-go, nft) can only work for the non-root agent if the
# agent itself holds the capability. The raise goes through a copy of util-linux's setpriv that carries
# cap_net_admin as a permitted-only file capability (no effective bit: it never makes an exec fail).
set -eu
bounding="$(sed -n 's/^CapBnd:[[:space:]]*//p' /proc/self/status)"
if [ $(( (0x$bounding >> 12) & 1 )) -eq 1 ]; then  # 12 = CAP_NET_ADMIN
  exec /usr/local/libexec/rma/setpriv --inh-caps +net_admin --ambient-caps +net_admin -- "$@"
fi
exec "$@"
