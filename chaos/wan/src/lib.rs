//! roamdisk-wan: the userspace WAN emulator (under construction).
