#!/bin/sh
# Builds the workload guest (multiboot v1 ELF32) from source: boot.S + main.c.
# usage: build.sh OUT_DIR   -> OUT_DIR/guest.elf
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUT_DIR}
CC=${GUEST_CC:-gcc}
CFLAGS="-m64 -O2 -ffreestanding -fno-builtin -fno-stack-protector -fno-pic -fno-pie \
 -mno-red-zone -mgeneral-regs-only -mcmodel=small -fno-asynchronous-unwind-tables \
 -Wall -Wextra -Werror"
$CC $CFLAGS -c "$here/main.c" -o "$out/main.o"
$CC -m64 -fno-pic -c "$here/boot.S" -o "$out/boot.o"
ld -m elf_x86_64 -nostdlib -static -z max-page-size=0x1000 -z noexecstack --no-warn-rwx-segments \
   -T "$here/guest.ld" -o "$out/guest64.elf" "$out/boot.o" "$out/main.o"
objcopy -O elf32-i386 "$out/guest64.elf" "$out/guest.elf"
