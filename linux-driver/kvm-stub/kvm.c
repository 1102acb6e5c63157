// SPDX-License-Identifier: GPL-2.0
/*
 * A module named "kvm" for the Bochs test image only (never for a real machine, where KVM's own
 * module has this name). KVM's selftests read /sys/module/kvm/parameters/force_emulation_prefix
 * in a library constructor before main: a missing file skips the test, and a non-zero value
 * makes the guest use KVM's forced-emulation prefix. sysfs cannot grow /sys/module/kvm by mkdir
 * or mount, so this module holds the parameter, 0, and nothing else.
 */
#include <linux/module.h>
#include <linux/moduleparam.h>

static int force_emulation_prefix;
module_param(force_emulation_prefix, int, 0444);
MODULE_PARM_DESC(force_emulation_prefix, "always 0: no forced emulation (the selftests read it)");

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("test-image stub: /sys/module/kvm/parameters/force_emulation_prefix for KVM's selftests");
