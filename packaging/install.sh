#!/bin/sh
# Installs ferry as a daemon: the binary, its systemd units, bash/zsh/fish
# completions and man pages generated from the binary itself, and the
# example cluster.toml (never over an existing one).
# Usage: packaging/install.sh [path/to/ferry] (default target/release/ferry);
# PREFIX (default /usr/local) and DESTDIR as usual.
set -eu
bin=${1:-target/release/ferry}
prefix=${PREFIX:-/usr/local}
root=${DESTDIR:-}
here=$(dirname "$0")
install -D -m 0755 "$bin" "$root$prefix/bin/ferry"
install -D -m 0644 "$here/systemd/ferry-agent.service" "$root/etc/systemd/system/ferry-agent.service"
install -D -m 0644 "$here/systemd/ferry-sched.service" "$root/etc/systemd/system/ferry-sched.service"
mkdir -p "$root$prefix/share/bash-completion/completions" \
  "$root$prefix/share/zsh/site-functions" \
  "$root$prefix/share/fish/vendor_completions.d"
"$bin" completions bash > "$root$prefix/share/bash-completion/completions/ferry"
"$bin" completions zsh > "$root$prefix/share/zsh/site-functions/_ferry"
"$bin" completions fish > "$root$prefix/share/fish/vendor_completions.d/ferry.fish"
"$bin" man "$root$prefix/share/man/man1"
if [ ! -e "$root/etc/ferry/cluster.toml" ]; then
  install -D -m 0644 "$here/cluster.toml" "$root/etc/ferry/cluster.toml"
fi
