//! Raw system calls: the device, ioctl with any number and any argument, memory with holes and
//! read-only pages, the module parameters, and thread signals. Everything returns the errno.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The module parameters.
const PARAMS: &str = "/sys/module/smudge/parameters";
/// Bytes of a page.
pub const PAGE: usize = 4096;

/// ioctls issued so far (every request this tool sent, malformed or not).
pub static IOCTLS: AtomicU64 = AtomicU64::new(0);

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Opens the device read-write.
pub fn open_dev() -> Result<i32, i32> {
    let path = c"/dev/smudge";
    // SAFETY: a NUL-terminated path.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        Err(errno())
    } else {
        Ok(fd)
    }
}

/// close(2).
pub fn close(fd: i32) -> Result<(), i32> {
    // SAFETY: closing a descriptor has no memory effect.
    if unsafe { libc::close(fd) } != 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

/// ioctl(2) with any number and any argument: the driver must check both.
pub fn ioctl(fd: i32, cmd: u32, arg: u64) -> Result<(), i32> {
    IOCTLS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the kernel validates `arg` as a user pointer (copy_from_user/copy_to_user); a bad
    // one is what this tool tests. Where it is a valid pointer it points at memory we own.
    let r = unsafe { libc::ioctl(fd, cmd as libc::c_ulong, arg as usize) };
    if r < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

/// read(2), write(2), lseek(2) and mmap(2) on the device, which offers none of them.
pub fn read(fd: i32) -> Result<(), i32> {
    let mut b = [0u8; 16];
    // SAFETY: 16 writable bytes.
    if unsafe { libc::read(fd, b.as_mut_ptr().cast(), b.len()) } < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

/// See [`read`].
pub fn write(fd: i32) -> Result<(), i32> {
    let b = [0u8; 16];
    // SAFETY: 16 readable bytes.
    if unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) } < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

/// See [`read`].
pub fn lseek(fd: i32) -> Result<(), i32> {
    // SAFETY: no memory effect.
    if unsafe { libc::lseek(fd, 4096, libc::SEEK_SET) } < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

/// mmap(2) of the device; returns the address (the caller unmaps it with [`munmap`]).
pub fn mmap_dev(fd: i32, len: usize, prot: i32, flags: i32, offset: i64) -> Result<u64, i32> {
    // SAFETY: a fresh mapping or MAP_FAILED.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, offset) };
    if p == libc::MAP_FAILED {
        Err(errno())
    } else {
        Ok(p as u64)
    }
}

/// mprotect(2) of a mapping.
pub fn mprotect(addr: u64, len: usize, prot: i32) -> Result<(), i32> {
    // SAFETY: changes only the protection of a mapping this tool made.
    if unsafe { libc::mprotect(addr as *mut libc::c_void, len, prot) } != 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

/// munmap(2).
pub fn munmap(addr: u64, len: usize) {
    // SAFETY: a mapping this tool made.
    unsafe { libc::munmap(addr as *mut libc::c_void, len) };
}

/// Anonymous memory whose last page can be made inaccessible (a hole right after the data) or
/// whose pages can be made read-only.
pub struct Mem {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain memory; callers synchronise their own use of its contents.
unsafe impl Send for Mem {}
// SAFETY: as above.
unsafe impl Sync for Mem {}

impl Mem {
    /// `pages` zeroed read-write pages.
    pub fn new(pages: usize) -> Mem {
        let len = pages * PAGE;
        // SAFETY: a fresh private anonymous mapping.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(ptr != libc::MAP_FAILED, "mmap of {pages} pages failed");
        Mem {
            ptr: ptr.cast(),
            len,
        }
    }

    /// `pages` accessible pages followed by one PROT_NONE page: data placed to end exactly at
    /// [`Mem::hole`] is readable, one byte more faults.
    pub fn with_hole(pages: usize) -> Mem {
        let m = Mem::new(pages + 1);
        m.protect(pages, 1, libc::PROT_NONE);
        m
    }

    /// Changes the protection of pages `[first, first + n)`.
    pub fn protect(&self, first: usize, n: usize, prot: i32) {
        // SAFETY: inside our mapping.
        let r = unsafe { libc::mprotect(self.ptr.add(first * PAGE).cast(), n * PAGE, prot) };
        assert!(r == 0, "mprotect failed");
    }

    /// The first address.
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// The address of the inaccessible page of [`Mem::with_hole`].
    pub fn hole(&self) -> u64 {
        self.addr() + (self.len - PAGE) as u64
    }

    /// Copies `bytes` to `addr` (inside this mapping, writable).
    pub fn put(&self, addr: u64, bytes: &[u8]) {
        let off = (addr - self.addr()) as usize;
        assert!(off + bytes.len() <= self.len);
        // SAFETY: inside our mapping, checked above.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(off), bytes.len()) };
    }

    /// Reads `n` bytes at `addr`.
    pub fn get(&self, addr: u64, n: usize) -> Vec<u8> {
        let off = (addr - self.addr()) as usize;
        assert!(off + n <= self.len);
        let mut v = vec![0u8; n];
        // SAFETY: inside our mapping, checked above.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), v.as_mut_ptr(), n) };
        v
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: our mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A module parameter's value.
pub fn param(name: &str) -> Option<String> {
    std::fs::read_to_string(format!("{PARAMS}/{name}"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Sets a module parameter.
pub fn set_param(name: &str, value: &str) -> Result<(), String> {
    std::fs::write(format!("{PARAMS}/{name}"), value).map_err(|e| format!("cannot set {name}: {e}"))
}

/// Pages every VM of the driver holds (the `pages_held` parameter).
pub fn pages_held() -> Option<u64> {
    param("pages_held").and_then(|s| s.parse().ok())
}

/// Sets `fail_alloc_after` for its lifetime, restores -1 (never fail) when dropped.
pub struct FaultInjection;

impl FaultInjection {
    /// Fails every page allocation of the driver after `n` more succeed.
    pub fn after(n: i64) -> Result<FaultInjection, String> {
        set_param("fail_alloc_after", &n.to_string())?;
        Ok(FaultInjection)
    }
}

impl Drop for FaultInjection {
    fn drop(&mut self) {
        let _ = set_param("fail_alloc_after", "-1");
    }
}

extern "C" fn on_sigalrm(_: libc::c_int) {}

/// Installs a do-nothing SIGALRM handler without SA_RESTART: a signal makes a pending RUN
/// return INTERRUPTED.
pub fn install_sigalrm() {
    // SAFETY: installs an async-signal-safe handler.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigalrm as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        sa.sa_flags = 0;
        libc::sigaction(libc::SIGALRM, &sa, std::ptr::null_mut());
    }
}

/// A thread that other threads can interrupt with SIGALRM.
#[derive(Default)]
pub struct Target {
    tid: AtomicU64,
    done: AtomicBool,
}

impl Target {
    /// Called by the thread itself first.
    pub fn register(&self) {
        // SAFETY: no preconditions.
        self.tid
            .store(unsafe { libc::pthread_self() } as u64, Ordering::Release);
    }
    /// Called by the thread itself last.
    pub fn finish(&self) {
        self.done.store(true, Ordering::Release);
    }
    /// The thread finished.
    pub fn done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }
    /// Sends SIGALRM unless the thread finished.
    pub fn interrupt(&self) {
        let t = self.tid.load(Ordering::Acquire);
        if t != 0 && !self.done() {
            // SAFETY: the thread is alive until `done` (it is never joined before).
            unsafe { libc::pthread_kill(t as libc::pthread_t, libc::SIGALRM) };
        }
    }
}

/// Busy-waits (yielding) until `cond` holds or `secs` of guest time passed; true if it holds.
/// No sleeping: on the emulated SMP machine idle CPUs advance time slowly, so a sleep costs far
/// more wall time than a busy wait.
pub fn wait_for(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        for _ in 0..100 {
            if cond() {
                return true;
            }
            std::thread::yield_now();
        }
        if std::time::Instant::now() > deadline {
            return cond();
        }
    }
}

/// Interrupts `targets` until all finished or `secs` passed; true if all finished.
pub fn interrupt_until_done(targets: &[&Target], secs: u64) -> bool {
    let mut polls = 0u32;
    wait_for(secs, || {
        polls += 1;
        if polls % 50 == 1 {
            targets.iter().for_each(|t| t.interrupt());
        }
        targets.iter().all(|t| t.done())
    })
}

/// The symbolic name of an errno.
pub fn errno_name(e: i32) -> String {
    match e {
        0 => "0 (success)".into(),
        libc::EPERM => "EPERM".into(),
        libc::EACCES => "EACCES".into(),
        libc::EIO => "EIO".into(),
        libc::ENOEXEC => "ENOEXEC".into(),
        libc::EBADF => "EBADF".into(),
        libc::ENOMEM => "ENOMEM".into(),
        libc::EFAULT => "EFAULT".into(),
        libc::EBUSY => "EBUSY".into(),
        libc::ENODEV => "ENODEV".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::ENOTTY => "ENOTTY".into(),
        libc::ESPIPE => "ESPIPE".into(),
        libc::EINTR => "EINTR".into(),
        libc::EOPNOTSUPP => "EOPNOTSUPP".into(),
        libc::ENOSPC => "ENOSPC".into(),
        libc::EEXIST => "EEXIST".into(),
        n => format!("errno {n}"),
    }
}
