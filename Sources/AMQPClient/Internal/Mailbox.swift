import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A unit of work for the connection thread. It receives the thread's driver, which only that
/// thread ever touches.
typealias ConnectionJob = @Sendable (ConnectionDriver) -> Void

/// The only way into a connection thread: a locked list of jobs plus a file descriptor that wakes
/// the thread from `poll`.
///
/// To keep the happy path lean, the wake-up write happens only when the thread has said it is
/// about to sleep; a busy thread picks new jobs up at its next turn without any system call.
final class Mailbox: Sendable {
    private struct State {
        var jobs: [ConnectionJob] = []
        var sleeping = false
        var closed = false
    }

    private let state = Mutex(State())
    /// Set by `submit`, cleared by `take`: lets the thread spin briefly before sleeping without
    /// taking the lock.
    private let pending = Atomic<Bool>(false)
    /// Read end the thread polls; becomes readable after `submit` wakes a sleeping thread.
    let wakeReadFD: Int32
    private let wakeWriteFD: Int32

    init() throws(AMQPError) {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else {
            throw AMQPError(code: .connectionFailed, message: "could not create a wake-up pipe: \(String(cString: strerror(errno)))")
        }
        for fd in fds {
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        }
        self.wakeReadFD = fds[0]
        self.wakeWriteFD = fds[1]
    }

    deinit {
        Glibc.close(self.wakeReadFD)
        Glibc.close(self.wakeWriteFD)
    }

    /// Queues a job; false when the connection is gone and the job will never run.
    @discardableResult
    func submit(_ job: @escaping ConnectionJob) -> Bool {
        let outcome: Bool? = self.state.withLock { state in
            if state.closed { return nil }
            state.jobs.append(job)
            self.pending.store(true, ordering: .releasing)
            if state.sleeping {
                state.sleeping = false
                return true
            }
            return false
        }
        guard let wake = outcome else { return false }
        if wake {
            var byte: UInt8 = 1
            _ = write(self.wakeWriteFD, &byte, 1)
        }
        return true
    }

    /// Moves every queued job into `buffer` (which must be empty).
    func take(into buffer: inout [ConnectionJob]) {
        self.pending.store(false, ordering: .relaxed)
        self.state.withLock { state in swap(&state.jobs, &buffer) }
    }

    /// True when a job may be waiting (cheap; no lock).
    var mayHaveJobs: Bool { self.pending.load(ordering: .acquiring) }

    /// Marks the thread as going to sleep, unless jobs are waiting (then returns false).
    func beginSleep() -> Bool {
        self.state.withLock { state in
            if !state.jobs.isEmpty { return false }
            state.sleeping = true
            return true
        }
    }

    /// Called after `poll` returns: clears the sleeping mark and drains the wake-up pipe when
    /// poll saw it readable (`woken`). (A wake written after poll returned stays in the pipe: the
    /// next poll returns at once and drains it. Reading an empty pipe on every wake-up cost a
    /// failing system call per turn.)
    func endSleep(woken: Bool) {
        self.state.withLock { $0.sleeping = false }
        guard woken else { return }
        var buffer = (UInt64(0), UInt64(0))
        while withUnsafeMutableBytes(of: &buffer, { read(self.wakeReadFD, $0.baseAddress, $0.count) }) > 0 {}
    }

    /// Refuses further jobs and returns those still queued.
    func close() -> [ConnectionJob] {
        self.state.withLock { state in
            state.closed = true
            let jobs = state.jobs
            state.jobs = []
            return jobs
        }
    }

    var isClosed: Bool { self.state.withLock { $0.closed } }
}
