import Foundation
import Synchronization

/// A TCP proxy on 127.0.0.1 that can freeze: while frozen it stops reading from both sides of the
/// connections it carries, as a hung peer or a partitioned network would (no RST, no bytes; the
/// kernel buffers fill and then stay full). Connections made while frozen are accepted and frozen
/// too; ``thaw()`` resumes them, ``cutExisting()`` closes the ones open now.
public final class FreezableProxy: Sendable {
    public let port: Int
    private let listener: Int32
    private let target: (host: String, port: Int)
    private let frozen = Atomic<Bool>(false)
    private let stopped = Atomic<Bool>(false)
    private let cut = Atomic<Bool>(false)
    private let accepted = Atomic<Int>(0)

    public init(targetHost: String, targetPort: Int) throws {
        let (fd, port) = try TestEnvironment.listenOnLoopback()
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        self.listener = fd
        self.port = port
        self.target = (targetHost, targetPort)
        let thread = Thread { [self] in self.run() }
        thread.name = "test-proxy-\(port)"
        thread.start()
    }

    /// Connections accepted so far.
    public var acceptedCount: Int { self.accepted.load(ordering: .relaxed) }
    public func freeze() { self.frozen.store(true, ordering: .relaxed) }
    public func thaw() { self.frozen.store(false, ordering: .relaxed) }
    /// Closes every connection open now (both sides); new ones are carried as usual.
    public func cutExisting() { self.cut.store(true, ordering: .relaxed) }
    public func stop() { self.stopped.store(true, ordering: .relaxed) }

    private func connectTarget() -> Int32? {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(self.target.port).bigEndian)
        address.sin_addr.s_addr = inet_addr(self.target.host == "localhost" ? "127.0.0.1" : self.target.host)
        let ok = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard ok == 0 else { close(fd); return nil }
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        return fd
    }

    private func run() {
        var pairs: [(Int32, Int32)] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        defer {
            for (a, b) in pairs { close(a); close(b) }
            close(self.listener)
        }
        while !self.stopped.load(ordering: .relaxed) {
            if self.cut.exchange(false, ordering: .relaxed) {
                for (a, b) in pairs { close(a); close(b) }
                pairs.removeAll()
            }
            var fds = [pollfd(fd: self.listener, events: Int16(POLLIN), revents: 0)]
            let frozen = self.frozen.load(ordering: .relaxed)
            if !frozen {
                for (a, b) in pairs {
                    fds.append(pollfd(fd: a, events: Int16(POLLIN), revents: 0))
                    fds.append(pollfd(fd: b, events: Int16(POLLIN), revents: 0))
                }
            }
            _ = poll(&fds, nfds_t(fds.count), 50)
            if fds[0].revents != 0 {
                while true {
                    let client = accept(self.listener, nil, nil)
                    guard client >= 0 else { break }
                    guard let upstream = self.connectTarget() else { close(client); continue }
                    _ = fcntl(client, F_SETFL, fcntl(client, F_GETFL) | O_NONBLOCK)
                    pairs.append((client, upstream))
                    self.accepted.add(1, ordering: .relaxed)
                }
            }
            guard !frozen else { continue }
            var dead = Set<Int>()
            for (index, (a, b)) in pairs.enumerated() {
                for (from, to) in [(a, b), (b, a)] {
                    let n = read(from, &buffer, buffer.count)
                    if n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR) { dead.insert(index); continue }
                    guard n > 0 else { continue }
                    var offset = 0
                    while offset < n {
                        let written = buffer[offset..<n].withUnsafeBytes { send(to, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                        if written > 0 { offset += written; continue }
                        if errno == EAGAIN || errno == EINTR {
                            var out = pollfd(fd: to, events: Int16(POLLOUT), revents: 0)
                            _ = poll(&out, 1, 100)
                            continue
                        }
                        dead.insert(index)
                        break
                    }
                }
            }
            for index in dead.sorted(by: >) {
                close(pairs[index].0)
                close(pairs[index].1)
                pairs.remove(at: index)
            }
        }
    }
}
