import Foundation
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Frees a connection thread that rabbitmq-c left stuck in a system call.
///
/// rabbitmq-c 0.11 can wait forever inside one call: a publish after the receive deadline reads
/// with an infinite timeout (#780), and a publish into a full socket buffer waits for room and
/// then enters that same read. On a peer that froze (no RST, no bytes) the thread never comes
/// back, heartbeats stop being checked and the connection looks alive. Each connection thread
/// marks when its current turn began; one process-wide thread looks twice a second and, when a
/// turn has lasted longer than the connection's limit (twice the heartbeat or the RPC timeout,
/// plus a margin), shuts the socket down. The blocked call then fails, and the connection
/// recovers as from any lost connection.
///
/// The watchdog never touches rabbitmq-c: it calls `shutdown(2)` on its own duplicate of the
/// socket's descriptor (made when the connection is armed, closed when it is disarmed), which
/// the kernel allows from any thread and which acts on the socket itself. rabbitmq-c closes its
/// descriptor on its own after a heartbeat or RPC timeout; the duplicate keeps that number from
/// being handed to another socket that could then be shut down by mistake.
final class StuckThreadWatchdog: Sendable {
    static let shared = StuckThreadWatchdog()

    final class Entry: Sendable {
        let connection: Int
        let logger: Logger
        /// The descriptor while connected (-1 otherwise) and the stall limit in nanoseconds.
        private let armed = Mutex<(fd: Int32, limit: Int64)>((-1, .max))
        /// Monotonic nanoseconds when the current turn began; 0 while the thread sleeps in poll.
        private let busySince = Atomic<Int64>(0)
        /// Set (to the stall in nanoseconds) when the watchdog shut the socket down.
        private let fired = Atomic<Int64>(0)

        init(connection: Int, logger: Logger) {
            self.connection = connection
            self.logger = logger
        }

        /// The owner thread begins a turn (cheap: one clock read, one relaxed store).
        func turnStarted() { self.busySince.store(monotonicNanoseconds(), ordering: .relaxed) }
        /// The owner thread is about to sleep in poll.
        func sleeping() { self.busySince.store(0, ordering: .relaxed) }

        func arm(fd: Int32, limit: Duration) {
            let (seconds, attoseconds) = limit.components
            let nanos = seconds.multipliedReportingOverflow(by: 1_000_000_000)
            self.fired.store(0, ordering: .relaxed)
            let own = fd >= 0 ? fcntl(fd, F_DUPFD_CLOEXEC, 0) : -1
            let previous = self.armed.withLock { armed -> Int32 in
                defer { armed = (own, nanos.overflow ? .max : nanos.partialValue &+ attoseconds / 1_000_000_000) }
                return armed.fd
            }
            if previous >= 0 { close(previous) }
        }

        func disarm() {
            let previous = self.armed.withLock { armed -> Int32 in
                defer { armed = (-1, .max) }
                return armed.fd
            }
            if previous >= 0 { close(previous) }
        }

        /// How long the thread was stuck, if the watchdog shut the socket down since `arm`.
        var firedAfter: Duration? {
            let nanos = self.fired.load(ordering: .relaxed)
            return nanos == 0 ? nil : .nanoseconds(nanos)
        }

        /// Called by the watchdog thread.
        func inspect(now: Int64) {
            let since = self.busySince.load(ordering: .relaxed)
            guard since != 0 else { return }
            let stalled = now - since
            let shut: Bool = self.armed.withLock { armed in
                guard armed.fd >= 0, stalled > armed.limit else { return false }
                _ = shutdown(armed.fd, Int32(SHUT_RDWR))
                close(armed.fd)
                armed.fd = -1
                return true
            }
            if shut {
                self.fired.store(max(1, stalled), ordering: .relaxed)
                self.logger.warning("amqp connection thread stuck in rabbitmq-c; socket shut down so the connection recovers",
                                    metadata: ["amqp.connection.id": "\(self.connection)", "stalled_ms": "\(stalled / 1_000_000)"])
            }
        }
    }

    private let entries = Mutex<[ObjectIdentifier: Entry]>([:])
    private let started = Atomic<Bool>(false)

    func register(_ entry: Entry) {
        self.entries.withLock { $0[ObjectIdentifier(entry)] = entry }
        if !self.started.exchange(true, ordering: .relaxed) { self.start() }
    }

    func unregister(_ entry: Entry) {
        entry.disarm()
        _ = self.entries.withLock { $0.removeValue(forKey: ObjectIdentifier(entry)) }
    }

    private func start() {
        let thread = Thread {
            while true {
                usleep(500_000)
                let now = monotonicNanoseconds()
                for entry in StuckThreadWatchdog.shared.entries.withLock({ Array($0.values) }) { entry.inspect(now: now) }
            }
        }
        thread.name = "aq-amqp-watch"
        thread.stackSize = 256 << 10
        thread.start()
    }
}

/// CLOCK_MONOTONIC in nanoseconds.
func monotonicNanoseconds() -> Int64 {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return Int64(now.tv_sec) &* 1_000_000_000 &+ Int64(now.tv_nsec)
}
