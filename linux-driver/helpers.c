// SPDX-License-Identifier: GPL-2.0
/*
 * The few kernel facilities Linux 6.12 offers to C only (macros, inlines, or structs missing
 * from the Rust bindings): the misc device, IRQ/preemption control, __va/__pa, the host
 * page-table lookup, module parameters and the reboot/panic notifiers. What the bindings have
 * (cross-CPU calls, cr4_update_irqsoff, cpus_read_lock, free_pages, kvfree) Rust calls
 * itself. Each function is one line of policy-free glue; everything else is Rust.
 */
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/miscdevice.h>
#include <linux/fs.h>
#include <linux/mm.h>
#include <linux/slab.h>
#include <linux/gfp.h>
#include <linux/smp.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/ktime.h>
#include <linux/reboot.h>
#include <linux/panic_notifier.h>
#include <linux/notifier.h>
#include <linux/anon_inodes.h>
#include <asm/tlbflush.h>
#include <asm/desc.h>
#include <asm/fpu/api.h>
#include <asm/msr.h>
#include <asm/pgtable_types.h>
#include <asm/pgtable.h>
#include <asm/cpufeature.h>
#include <asm/processor.h>
#include <asm/reboot.h>
#include <linux/cpu.h>
#include <linux/syscore_ops.h>

/* Implemented in smudge_main.rs. */
long smudge_rs_open(void **priv);
void smudge_rs_release(void *priv);
long smudge_rs_ioctl(void *priv, unsigned int cmd, unsigned long arg);
void smudge_rs_emergency_vmxoff(void);
void smudge_rs_emergency_report(void);
int smudge_rs_cpu_online(unsigned int cpu);
bool smudge_rs_cpu_offline(unsigned int cpu);

/* Module parameters: fault injection, the driver-wide page count (read-only; core's
 * hostmem::PageBudget updates it atomically) and its cap (0: core's default, half of RAM). */
static int fail_alloc_after = -1;
module_param(fail_alloc_after, int, 0644);
MODULE_PARM_DESC(fail_alloc_after, "fail every page allocation after this many more succeed (-1: never)");
unsigned long smudge_pages_held_count;
module_param_named(pages_held, smudge_pages_held_count, ulong, 0444);
MODULE_PARM_DESC(pages_held, "pages held by all VMs (0 when none is open)");
static unsigned long max_pages;
module_param(max_pages, ulong, 0644);
MODULE_PARM_DESC(max_pages, "most pages all VMs together may hold (0: half of RAM)");
unsigned long smudge_max_pages(void) { return READ_ONCE(max_pages); }
static unsigned long reserve_pages;
module_param(reserve_pages, ulong, 0644);
MODULE_PARM_DESC(reserve_pages, "refuse VM pages while MemAvailable is below this (0: 1/64 of RAM, at least 16 MiB)");
unsigned long smudge_reserve_pages(void) { return READ_ONCE(reserve_pages); }
unsigned long smudge_totalram_pages(void) { return totalram_pages(); }

int smudge_fault_inject(void)
{
	int n = READ_ONCE(fail_alloc_after);
	if (n < 0)
		return 0;
	if (n == 0)
		return 1;
	WRITE_ONCE(fail_alloc_after, n - 1);
	return 0;
}

/* Test hook: 1 = corrupt guest CR0.PE in the next new VMCS (the software checker must refuse it
 * before VMLAUNCH), 2 = the same but skip the pre-check so the processor refuses it and the
 * checker explains why. */
static int test_bad_vmcs;
module_param(test_bad_vmcs, int, 0644);
MODULE_PARM_DESC(test_bad_vmcs, "test hook: 1/2 corrupt the guest state of new VMCSs (see README)");
int smudge_test_bad_vmcs(void) { return READ_ONCE(test_bad_vmcs); }

/* Speculation barriers around VM entries (core's `spec`): the kernel's choices, or every one
 * the CPU supports; and the test-only read-out of the host's debug state. Read at load. */
static bool force_barriers;
module_param(force_barriers, bool, 0444);
MODULE_PARM_DESC(force_barriers, "every speculation barrier the CPU supports before each VM entry, needed or not (default: the kernel's bug bits and mitigation choices, as KVM)");
bool smudge_force_barriers(void) { return force_barriers; }
static bool probe_host;
module_param(probe_host, bool, 0444);
MODULE_PARM_DESC(probe_host, "test only: compare the host's DR0-DR3, DR7, DEBUGCTL and XCR0 before each run with their values after every VM exit (STATS counts differences)");
bool smudge_probe_host(void) { return probe_host; }

/* Fills core's spec::KernelChoices (repr(C), the same fields in the same order). */
struct smudge_kernel_choices {
	bool l1tf_bug, l1tf_mitigated, skip_l1d_flush_vmentry, flush_l1d, clear_cpu_buf, use_ibpb;
};
void smudge_kernel_choices(struct smudge_kernel_choices *k)
{
	u64 arch_caps = 0;

	if (boot_cpu_has(X86_FEATURE_ARCH_CAPABILITIES))
		rdmsrl_safe(MSR_IA32_ARCH_CAPABILITIES, &arch_caps);
	k->l1tf_bug = boot_cpu_has_bug(X86_BUG_L1TF);
#if IS_ENABLED(CONFIG_KVM_INTEL)
	k->l1tf_mitigated = l1tf_mitigation != L1TF_MITIGATION_OFF;
#else
	/* l1tf_mitigation is exported for KVM only. */
	k->l1tf_mitigated = !cpu_mitigations_off();
#endif
	k->skip_l1d_flush_vmentry = arch_caps & ARCH_CAP_SKIP_VMENTRY_L1DFLUSH;
	k->flush_l1d = boot_cpu_has(X86_FEATURE_FLUSH_L1D);
	k->clear_cpu_buf = cpu_feature_enabled(X86_FEATURE_CLEAR_CPU_BUF);
	k->use_ibpb = boot_cpu_has(X86_FEATURE_USE_IBPB);
}


static int smudge_open(struct inode *inode, struct file *f)
{
	void *priv = NULL;
	long r = smudge_rs_open(&priv);
	if (r)
		return r;
	f->private_data = priv;
	return 0;
}
static int smudge_release(struct inode *inode, struct file *f) { smudge_rs_release(f->private_data); return 0; }
static long smudge_ioctl(struct file *f, unsigned int cmd, unsigned long arg) { return smudge_rs_ioctl(f->private_data, cmd, arg); }

/*
 * A read-only view of guest RAM for `smudge explain`: its user PTEs map the same backing pages
 * as the EPT leaves, and stay D=0 while the guest dirties them. Writable or executable mappings
 * are refused: a user write would bypass the EPT and the dirty log. The open file (held by the
 * vma) keeps the VM and its pages alive until munmap. Pages not backed yet are left unmapped.
 */
long smudge_rs_mmap(void *obj, void *vma, unsigned long pgoff, unsigned long pages, bool kvm);
static int smudge_mmap(struct file *f, struct vm_area_struct *vma)
{
	if (vma->vm_flags & (VM_WRITE | VM_EXEC))
		return -EPERM;
	vm_flags_clear(vma, VM_MAYWRITE | VM_MAYEXEC);
	return smudge_rs_mmap(f->private_data, vma, vma->vm_pgoff, vma_pages(vma), false);
}
int smudge_remap_page(struct vm_area_struct *vma, unsigned long i, unsigned long pfn)
{
	return remap_pfn_range(vma, vma->vm_start + i * PAGE_SIZE, pfn, PAGE_SIZE, vma->vm_page_prot);
}

static const struct file_operations smudge_fops = {
	.owner = THIS_MODULE,
	.open = smudge_open,
	.release = smudge_release,
	.unlocked_ioctl = smudge_ioctl,
	.mmap = smudge_mmap,
};
static struct miscdevice smudge_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "smudge",
	.fops = &smudge_fops,
	/* Root only, like /dev/kvm before a distribution's udev rule opens it to a group (README). */
	.mode = 0600,
};

/*
 * The KVM personality (kvm=1): /dev/kvm, and KVM's anonymous-inode descriptors for a VM and its
 * vCPUs. Rust decodes and serves every request; when one makes a VM or a vCPU it hands back the
 * object (`made`, and whether it is a VM) and this glue gives it a descriptor.
 */
static bool kvm;
module_param(kvm, bool, 0444);
MODULE_PARM_DESC(kvm, "also serve KVM's user API (the subset KVM's dirty-log selftests use) on /dev/kvm");
static int kvm_mode;
module_param(kvm_mode, int, 0444);
MODULE_PARM_DESC(kvm_mode, "dirty tracking of KVM VMs: 0 the best available, 1 A/D, 2 PML, 3 write-protect");
bool smudge_kvm_param(void) { return kvm; }
int smudge_kvm_mode(void) { return kvm_mode; }

long smudge_rs_kvm_ioctl(void *obj, unsigned int cmd, unsigned long arg, void **made, bool *made_vm);
void smudge_rs_kvm_put(void *obj, bool made);
static const struct file_operations smudge_kvm_vm_fops, smudge_kvm_vcpu_fops;
static long smudge_kvm_ioctl_common(void *obj, unsigned int cmd, unsigned long arg)
{
	void *made = NULL;
	bool vm = false;
	int fd;
	long r = smudge_rs_kvm_ioctl(obj, cmd, arg, &made, &vm);

	if (r < 0 || !made)
		return r;
	fd = anon_inode_getfd(vm ? "kvm-vm" : "kvm-vcpu", vm ? &smudge_kvm_vm_fops : &smudge_kvm_vcpu_fops,
			      made, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		smudge_rs_kvm_put(made, false);
	return fd;
}
static long smudge_kvm_dev_ioctl(struct file *f, unsigned int cmd, unsigned long arg) { return smudge_kvm_ioctl_common(NULL, cmd, arg); }
static long smudge_kvm_file_ioctl(struct file *f, unsigned int cmd, unsigned long arg) { return smudge_kvm_ioctl_common(f->private_data, cmd, arg); }
static int smudge_kvm_release(struct inode *i, struct file *f) { smudge_rs_kvm_put(f->private_data, true); return 0; }
/* The kvm_run page, shared with the kernel: MAP_SHARED only, never executable. */
static int smudge_kvm_vcpu_mmap(struct file *f, struct vm_area_struct *vma)
{
	if (!(vma->vm_flags & VM_SHARED) || (vma->vm_flags & VM_EXEC))
		return -EINVAL;
	vm_flags_clear(vma, VM_MAYEXEC);
	return smudge_rs_mmap(f->private_data, vma, vma->vm_pgoff, vma_pages(vma), true);
}
static const struct file_operations smudge_kvm_vm_fops = {
	.owner = THIS_MODULE,
	.release = smudge_kvm_release,
	.unlocked_ioctl = smudge_kvm_file_ioctl,
	.llseek = noop_llseek,
};
static const struct file_operations smudge_kvm_vcpu_fops = {
	.owner = THIS_MODULE,
	.release = smudge_kvm_release,
	.unlocked_ioctl = smudge_kvm_file_ioctl,
	.mmap = smudge_kvm_vcpu_mmap,
	.llseek = noop_llseek,
};
static const struct file_operations smudge_kvm_dev_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = smudge_kvm_dev_ioctl,
	.llseek = noop_llseek,
};
static struct miscdevice smudge_kvm_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "kvm",
	.fops = &smudge_kvm_dev_fops,
	.mode = 0600,
};
/* KVM_SET_SIGNAL_MASK's mask inside KVM_RUN, as KVM's kvm_sigset_activate: the thread's own
 * mask goes to current->real_blocked, where complete_signal() looks before it turns a signal
 * with a fatal default action into a group exit; a signal the thread blocks outside KVM_RUN
 * then ends the run and stays pending instead of killing the process. SIGKILL and SIGSTOP stay
 * deliverable. */
void smudge_sigmask_enter(u64 mask)
{
	sigset_t set;

	siginitset(&set, mask & ~(sigmask(SIGKILL) | sigmask(SIGSTOP)));
	sigprocmask(SIG_SETMASK, &set, &current->real_blocked);
}
/* KVM's kvm_sigset_deactivate: the thread's own mask back. */
void smudge_sigmask_leave(void)
{
	sigprocmask(SIG_SETMASK, &current->real_blocked, NULL);
	sigemptyset(&current->real_blocked);
}
/* Pins up to n pages of the caller's memory from uaddr for a VM's EPT (KVM's memory slots):
 * long-term, writable; their physical addresses go to hpas. Returns how many were pinned, or
 * -errno. */
long smudge_pin_user_pages(unsigned long uaddr, unsigned long n, u64 *hpas)
{
	struct page *pages[16];
	long got, i;

	if (n > ARRAY_SIZE(pages))
		n = ARRAY_SIZE(pages);
	mmap_read_lock(current->mm);
	got = pin_user_pages(uaddr, n, FOLL_WRITE | FOLL_LONGTERM, pages);
	mmap_read_unlock(current->mm);
	for (i = 0; i < got; i++)
		hpas[i] = PFN_PHYS(page_to_pfn(pages[i]));
	return got;
}
/* The guest may have written the page: unpin it marked dirty. */
void smudge_unpin_user_page(u64 hpa)
{
	struct page *p = pfn_to_page(PHYS_PFN(hpa));

	unpin_user_pages_dirty_lock(&p, 1, true);
}

/*
 * INIT is blocked in VMX root operation (SDM 25.8), so a CPU left in it hangs a reboot and keeps
 * kdump's kernel from starting it. The reboot and panic notifiers leave VMX on the CPU they run
 * on. The other CPUs: where the kernel has KVM support (CONFIG_KVM_X86, =m in distribution
 * kernels), the crash NMI shootdown and the emergency stop of the other CPUs call the one
 * registered virtualization callback on each of them, as they do for KVM; without it they
 * halt in VMX operation. (Linux drops their messages while another CPU panics: the CPU that
 * panics or reboots reports for all.)
 */
static int smudge_reboot(struct notifier_block *nb, unsigned long code, void *unused)
{
	unsigned long flags;

	/* The reboot notifier runs preemptible: stay on one CPU. */
	local_irq_save(flags);
	smudge_rs_emergency_vmxoff();
	local_irq_restore(flags);
	smudge_rs_emergency_report();
	return NOTIFY_DONE;
}
static struct notifier_block smudge_reboot_nb = { .notifier_call = smudge_reboot };
static struct notifier_block smudge_panic_nb = { .notifier_call = smudge_reboot };
void smudge_notifiers_register(void)
{
	register_reboot_notifier(&smudge_reboot_nb);
	atomic_notifier_chain_register(&panic_notifier_list, &smudge_panic_nb);
#if IS_ENABLED(CONFIG_KVM_X86)
	/* The kernel holds one such callback: with KVM's registered (kvm_intel loaded), this one
	 * warns and is ignored, and smudge leaves VMX only where its notifiers run. */
	cpu_emergency_register_virt_callback(smudge_rs_emergency_vmxoff);
	pr_info("smudge: registered the kernel's virtualization callback: VMX is left on every CPU in a crash or emergency reboot (unless kvm_intel, loaded first, holds the one callback)\n");
#else
	pr_info("smudge: leaves VMX only on the CPU that reboots or panics (no CONFIG_KVM_X86: the kernel has no virtualization callback)\n");
#endif
}
void smudge_notifiers_unregister(void)
{
#if IS_ENABLED(CONFIG_KVM_X86)
	cpu_emergency_unregister_virt_callback(smudge_rs_emergency_vmxoff);
#endif
	atomic_notifier_chain_unregister(&panic_notifier_list, &smudge_panic_nb);
	unregister_reboot_notifier(&smudge_reboot_nb);
}

/* (kvm=1) /dev/kvm, which fails when KVM's own exists, then /dev/smudge, so that nothing can open
 * a device of a module whose init fails. 0, or -errno with no device left. */
int smudge_register(void)
{
	int r;

	if (kvm) {
		r = misc_register(&smudge_kvm_misc);
		if (r) {
			pr_err("smudge: cannot serve /dev/kvm: a device of that name exists (unload kvm_intel)\n");
			return r;
		}
	}
	r = misc_register(&smudge_misc);
	if (r && kvm)
		misc_deregister(&smudge_kvm_misc);
	return r;
}
void smudge_devices_unregister(void)
{
	if (kvm)
		misc_deregister(&smudge_kvm_misc);
	misc_deregister(&smudge_misc);
}

/*
 * CPU hotplug: a CPU going offline leaves VMX operation first (INIT, which brings it back, is
 * blocked in VMX root operation), one coming online enters it. Both run on that CPU
 * (CPUHP_AP_ONLINE_DYN). Module init holds the CPU-hotplug lock from the load to the
 * registration, so no CPU changes in between.
 */
static int smudge_hp_state = -1;
static int smudge_cpu_up(unsigned int cpu) { return min(smudge_rs_cpu_online(cpu), 0); }
static int smudge_cpu_down(unsigned int cpu) { smudge_rs_cpu_offline(cpu); return 0; }
/*
 * A system sleep (suspend to RAM, hibernation) takes every CPU but the boot CPU offline first
 * (the callbacks above), then runs the syscore callbacks on the boot CPU with interrupts off:
 * it leaves VMX operation, which the sleep loses while the kernel restores the CR4 it saved,
 * VMXE included, and enters it again on the way back (as KVM's kvm_suspend, kvm_resume).
 */
static int smudge_sleep(void *data)
{
	int cpu = smp_processor_id();

	if (smudge_rs_cpu_offline(cpu))
		pr_info("smudge: CPU %d left VMX operation for a system sleep\n", cpu);
	return 0;
}
static void smudge_wake(void *data)
{
	int cpu = smp_processor_id();

	if (smudge_rs_cpu_online(cpu) > 0)
		pr_info("smudge: CPU %d in VMX operation again after a system sleep\n", cpu);
}
static const struct syscore_ops smudge_syscore_ops = { .suspend = smudge_sleep, .resume = smudge_wake };
static struct syscore smudge_syscore = { .ops = &smudge_syscore_ops };
int smudge_hotplug_register(void)
{
	int r = cpuhp_setup_state_nocalls_cpuslocked(CPUHP_AP_ONLINE_DYN, "smudge:online",
						      smudge_cpu_up, smudge_cpu_down);

	if (r < 0)
		return r;
	smudge_hp_state = r;
	register_syscore(&smudge_syscore);
	return 0;
}
/* With cpus_read_lock held. */
void smudge_hotplug_unregister(void)
{
	if (smudge_hp_state >= 0) {
		unregister_syscore(&smudge_syscore);
		cpuhp_remove_state_nocalls_cpuslocked(smudge_hp_state);
	}
	smudge_hp_state = -1;
}

unsigned long smudge_irq_save(void) { unsigned long f; local_irq_save(f); return f; }
void smudge_irq_restore(unsigned long f) { local_irq_restore(f); }
/* CR4 through the kernel's shadow (a raw mov to CR4 would be undone by the next cr4 update). */
int smudge_rdmsr_safe(u32 msr, u64 *val) { return rdmsrl_safe(msr, val); }
void *smudge_va(u64 pa) { return __va(pa); }
u64 smudge_pa(void *va) { return __pa(va); }
/*
 * Every allocation a VM makes on demand (pages, request buffers): fail rather than wake the OOM
 * killer, no warning for a failure the caller reports, charged to the opener's memory cgroup
 * (as KVM's GFP_KERNEL_ACCOUNT). The Rust alloc::Flags of 6.12 lack __GFP_RETRY_MAYFAIL.
 * Only in process context: the run loop takes guest pages from a per-vCPU cache refilled here.
 */
#define SMUDGE_GFP (GFP_KERNEL_ACCOUNT | __GFP_RETRY_MAYFAIL | __GFP_NOWARN)
unsigned long smudge_get_zeroed_page(void) { return get_zeroed_page(SMUDGE_GFP); }
void *smudge_kvzalloc(unsigned long n) { return kvzalloc(n, SMUDGE_GFP); }
/* A VM exit leaves the TR limit at 0x67 (SDM 28.5.2); Linux's TSS is longer (the I/O bitmap).
 * The kernel's own helper reloads TR lazily before a task with an I/O bitmap needs it. */
void smudge_invalidate_tss_limit(void) { invalidate_tss_limit(); }
void smudge_fpu_begin(void) { kernel_fpu_begin(); }
void smudge_fpu_end(void) { kernel_fpu_end(); }
int smudge_cpu(void) { return smp_processor_id(); }
bool smudge_cpu_online(int cpu) { return cpu_online(cpu); }
int smudge_need_resched(void) { return need_resched(); }
void smudge_cond_resched(void) { cond_resched(); }
/* The calling process's page-table entry for a user address in a PFN mapping (our mmap):
 * the flag bits (A = 5, D = 6) and the frame, as follow_pfnmap reports them. */
u64 smudge_user_pte(unsigned long va, unsigned int *level)
{
	struct mm_struct *mm = current->mm;
	struct follow_pfnmap_args args = { .address = va };
	u64 v = 0;
	*level = 0;
	if (!mm)
		return 0;
	mmap_read_lock(mm);
	args.vma = vma_lookup(mm, va);
	if (args.vma && (args.vma->vm_flags & VM_PFNMAP) && !follow_pfnmap_start(&args)) {
		v = ((u64)args.pfn << PAGE_SHIFT) | (pgprot_val(args.pgprot) & ~PTE_PFN_MASK);
		*level = 1;
		follow_pfnmap_end(&args);
	}
	mmap_read_unlock(mm);
	return v;
}

/* The host page-table entry that maps a kernel virtual address, and its level (1 = 4 KiB). */
u64 smudge_host_pte(unsigned long va, unsigned int *level)
{
	unsigned int l = 0;
	pte_t *pte = lookup_address(va, &l);
	*level = l == PG_LEVEL_4K ? 1 : l == PG_LEVEL_2M ? 2 : l == PG_LEVEL_1G ? 3 : 0;
	return pte ? pte_val(*pte) : 0;
}
