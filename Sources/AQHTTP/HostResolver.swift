import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// An address to connect to, as `connect` takes it, with the address the policy checks.
struct SocketAddress {
    var storage: sockaddr_storage
    var length: socklen_t
    var family: Int32
    var ip: IPAddress

    /// An IP literal (`127.0.0.1`, `::1`; no brackets) on `port`, or nil.
    init?(literal host: String, port: Int) {
        var v4 = in_addr()
        var v6 = in6_addr()
        if inet_pton(AF_INET, host, &v4) == 1 {
            var sin = sockaddr_in()
            sin.sin_family = sa_family_t(AF_INET)
            sin.sin_port = in_port_t(UInt16(port).bigEndian)
            sin.sin_addr = v4
            self.init(sin)
        } else if inet_pton(AF_INET6, host, &v6) == 1 {
            var sin6 = sockaddr_in6()
            sin6.sin6_family = sa_family_t(AF_INET6)
            sin6.sin6_port = in_port_t(UInt16(port).bigEndian)
            sin6.sin6_addr = v6
            self.init(sin6)
        } else {
            return nil
        }
    }

    init(_ sin: sockaddr_in) {
        var storage = sockaddr_storage()
        withUnsafeMutableBytes(of: &storage) { raw in withUnsafeBytes(of: sin) { raw.copyMemory(from: $0) } }
        self.storage = storage
        self.length = socklen_t(MemoryLayout<sockaddr_in>.size)
        self.family = AF_INET
        self.ip = IPAddress(v4: withUnsafeBytes(of: sin.sin_addr.s_addr) { Array($0) })
    }

    init(_ sin6: sockaddr_in6) {
        var storage = sockaddr_storage()
        withUnsafeMutableBytes(of: &storage) { raw in withUnsafeBytes(of: sin6) { raw.copyMemory(from: $0) } }
        self.storage = storage
        self.length = socklen_t(MemoryLayout<sockaddr_in6>.size)
        self.family = AF_INET6
        self.ip = IPAddress(v6: withUnsafeBytes(of: sin6.sin6_addr) { Array($0) })
    }

    /// `host:port` (IPv6 in brackets), for messages.
    var text: String {
        let port: UInt16 = withUnsafeBytes(of: self.storage) { raw in
            self.family == AF_INET ? raw.load(as: sockaddr_in.self).sin_port.bigEndian : raw.load(as: sockaddr_in6.self).sin6_port.bigEndian
        }
        return self.family == AF_INET6 ? "[\(self.ip)]:\(port)" : "\(self.ip):\(port)"
    }
}

/// Host names to addresses without blocking the thread that asks: each lookup runs
/// `getaddrinfo` on a short-lived thread of its own (as libcurl's threaded resolver does), and
/// the asking thread learns of the answers through a descriptor it polls (``wakeFD``). Answers
/// are kept for a minute. One thread owns the resolver; only the lookups' threads share its box.
final class HostResolver {
    enum Answer {
        case addresses([SocketAddress])
        case failure(String)
    }

    /// What lookup threads and the owner share: answers not yet taken, and the pipe that says
    /// there are some. `@unchecked Sendable`: `answers` is only touched under `lock`; the pipe's
    /// descriptors are set in `init`, never changed, and closed in `deinit`, which runs after the
    /// last lookup thread (each holds a reference) has written to it.
    final class Box: @unchecked Sendable {
        let lock = Mutex<[(host: String, answer: Answer)]>([])
        let readFD: Int32
        let writeFD: Int32
        init() {
            var fds: [Int32] = [-1, -1]
            if pipe(&fds) == 0 {
                for fd in fds {
                    _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
                    _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
                }
            } else {
                fds = [-1, -1]
            }
            self.readFD = fds[0]
            self.writeFD = fds[1]
        }
        deinit {
            if self.readFD >= 0 { close(self.readFD) }
            if self.writeFD >= 0 { close(self.writeFD) }
        }
        func post(_ host: String, _ answer: Answer) {
            self.lock.withLock { $0.append((host, answer)) }
            var one: UInt8 = 1
            _ = write(self.writeFD, &one, 1)
        }
    }

    private let box = Box()
    private var cache: [String: (addresses: [SocketAddress], expires: UInt64)] = [:]
    /// Hosts being looked up.
    private var pending: Set<String> = []
    /// How long an answer is kept (libcurl's default DNS cache timeout).
    static let cacheNanoseconds: UInt64 = 60_000_000_000
    static let maxCached = 4096

    /// The descriptor to poll for answers (readable when some came), while ``isWaiting``.
    var wakeFD: Int32 { self.box.readFD }
    var isWaiting: Bool { !self.pending.isEmpty }
    /// Lookups in flight now (tests).
    var lookupsInFlight: Int { self.pending.count }

    /// The cached addresses of `host`, or nil after starting a lookup (answered by ``takeAnswers()``).
    func lookup(_ host: String, now: UInt64) -> [SocketAddress]? {
        if let hit = self.cache[host] {
            if hit.expires > now { return hit.addresses }
            self.cache[host] = nil
        }
        guard self.pending.insert(host).inserted else { return nil }
        if self.running < Self.maxThreads { self.run(host) } else { self.queued.append(host) }
        return nil
    }

    /// Lookups at once, a thread each (as many as requests may be in flight by default: one
    /// host whose name server never answers cannot hold up the lookups of others); more wait
    /// their turn, and a waiting one nobody needs any more is dropped (``abandon(_:)``).
    static let maxThreads = 256
    private var running = 0
    private var queued: [String] = []
    private var queuedHead = 0

    /// Nobody waits for `host`'s addresses any more: a lookup that has not started is dropped.
    func abandon(_ host: String) {
        guard let index = self.queued[self.queuedHead...].firstIndex(of: host) else { return }
        self.queued.remove(at: index)
        self.pending.remove(host)
    }

    /// Whether lookups can be answered at all (the pipe they answer through exists).
    var isUsable: Bool { self.box.readFD >= 0 && self.box.writeFD >= 0 }

    private func run(_ host: String) {
        self.running += 1
        let box = self.box
        let thread = Thread {
            box.post(host, Self.resolve(host))
        }
        thread.stackSize = 256 * 1024
        thread.start()
    }

    /// The answers that came since the last call; addresses are cached (with port 0: the
    /// caller sets its own).
    func takeAnswers(now: UInt64) -> [(host: String, answer: Answer)] {
        var drain = [UInt8](repeating: 0, count: 64)
        while read(self.box.readFD, &drain, drain.count) == drain.count {}
        let answers = self.box.lock.withLock { answers in
            let taken = answers
            answers.removeAll()
            return taken
        }
        for (host, answer) in answers {
            self.pending.remove(host)
            self.running -= 1
            if self.queuedHead < self.queued.count {
                self.run(self.queued[self.queuedHead])
                self.queuedHead += 1
                if self.queuedHead == self.queued.count || self.queuedHead > 256 {
                    self.queued.removeFirst(self.queuedHead)
                    self.queuedHead = 0
                }
            }
            if case .addresses(let addresses) = answer {
                if self.cache.count >= Self.maxCached {
                    // Expired answers first; when all are fresh, any half of them.
                    self.cache = self.cache.filter { $0.value.expires > now }
                    if self.cache.count >= Self.maxCached { self.cache = Dictionary(uniqueKeysWithValues: self.cache.prefix(Self.maxCached / 2).map { ($0.key, $0.value) }) }
                }
                self.cache[host] = (addresses, now + Self.cacheNanoseconds)
            }
        }
        return answers
    }

    /// `getaddrinfo` for TCP, IPv4 and IPv6 in the system's order (port 0).
    static func resolve(_ host: String) -> Answer {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_protocol = Int32(IPPROTO_TCP)
        var list: UnsafeMutablePointer<addrinfo>?
        let status = getaddrinfo(host, nil, &hints, &list)
        guard status == 0 else {
            let text = gai_strerror(status).map { String(cString: $0) } ?? "error \(status)"
            return .failure("could not resolve host \(host): \(text)")
        }
        defer { freeaddrinfo(list) }
        var addresses: [SocketAddress] = []
        var node = list
        while let entry = node {
            if let address = entry.pointee.ai_addr {
                if entry.pointee.ai_family == AF_INET {
                    addresses.append(SocketAddress(UnsafeRawPointer(address).load(as: sockaddr_in.self)))
                } else if entry.pointee.ai_family == AF_INET6 {
                    addresses.append(SocketAddress(UnsafeRawPointer(address).load(as: sockaddr_in6.self)))
                }
            }
            node = entry.pointee.ai_next
        }
        // The same address once (getaddrinfo may list it per socket type or protocol).
        var seen: Set<IPAddress> = []
        addresses = addresses.filter { seen.insert($0.ip).inserted }
        return addresses.isEmpty ? .failure("could not resolve host \(host): no IPv4 or IPv6 address") : .addresses(addresses)
    }
}

extension SocketAddress {
    /// The address with `port`.
    func with(port: Int) -> SocketAddress {
        var copy = self
        let networkPort = in_port_t(UInt16(port).bigEndian)
        let offset = self.family == AF_INET ? MemoryLayout<sockaddr_in>.offset(of: \sockaddr_in.sin_port) : MemoryLayout<sockaddr_in6>.offset(of: \sockaddr_in6.sin6_port)
        withUnsafeMutableBytes(of: &copy.storage) { raw in raw.storeBytes(of: networkPort, toByteOffset: offset ?? 2, as: in_port_t.self) }
        return copy
    }
}
