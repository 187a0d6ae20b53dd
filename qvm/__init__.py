"""qvm: launch, supervise and hotplug QEMU/KVM test VMs defined in TOML files."""
