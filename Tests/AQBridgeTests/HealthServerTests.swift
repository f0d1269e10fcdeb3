import AQBridge
import AQHTTP
import AQTestSupport
import Foundation
import Testing

/// The health and metrics server against clients that do not play along: a pipeliner that never
/// reads, thousands of idle connections, slow requests, a process out of file descriptors.
@Suite(.serialized, .timeLimit(.minutes(2))) struct HealthServerTests {
    static func connect(_ port: Int) throws -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let ok = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard ok == 0 else {
            close(fd)
            throw HarnessError(description: "connect to \(port) failed: \(errno)")
        }
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        return fd
    }

    /// One request on a new connection; the status line's code.
    static func get(_ port: Int, _ path: String) throws -> Int {
        let fd = try self.connect(port)
        defer { close(fd) }
        let request = Array("GET \(path) HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".utf8)
        _ = request.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        var buffer = [UInt8](repeating: 0, count: 4096)
        let n = recv(fd, &buffer, buffer.count, 0)
        guard n > 12 else { return -1 }
        return Int(String(decoding: buffer[9..<12], as: UTF8.self)) ?? -1
    }

    static func metricsServer(limits: HTTPServer.Limits = .init()) throws -> HTTPServer {
        let page = String(repeating: "aq_bridge_metric_total 1\n", count: 200)  // ~5 KB, like /metrics
        return try HTTPServer(limits: limits) { _, responder in responder.respond(.text(page)) }
    }

    @Test func aClientPipeliningWithoutReadingCannotGrowTheServer() async throws {
        var limits = HTTPServer.Limits()
        limits.maxBufferedBytes = 64 << 10
        let server = try Self.metricsServer(limits: limits)
        defer { server.shutdown() }
        let fd = try Self.connect(server.port)
        defer { close(fd) }
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        let request = Array("GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n".utf8)
        var sent = 0
        // Pipeline until the kernel will take no more (bounded: 200,000 requests, ~7 MB).
        while sent < 200_000 {
            let n = request.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { break }
            sent += 1
        }
        #expect(sent > 100)
        try await waitFor("the server to stop reading", timeout: .seconds(10)) { server.currentUsage.bufferedBytes > 0 }
        try await Task.sleep(for: .milliseconds(300))  // let it read all it is willing to
        let usage = server.currentUsage
        #expect(usage.bufferedBytes <= limits.maxBufferedBytes + 65536 + 8192, "buffers \(usage.bufferedBytes) bytes for one client")
        // The client reads: answers flow again.
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
        var received = 0
        var buffer = [UInt8](repeating: 0, count: 65536)
        while received < 1 << 20 {
            let n = recv(fd, &buffer, buffer.count, 0)
            guard n > 0 else { break }
            received += n
        }
        #expect(received >= 1 << 20, "the server resumed once the client read")
        #expect(try Self.get(server.port, "/metrics") == 200, "and others are served meanwhile")
    }

    @Test func idleConnectionsBeyondTheCapMakeRoomForNewClients() throws {
        var limits = HTTPServer.Limits()
        limits.maxConnections = 50
        let server = try Self.metricsServer(limits: limits)
        defer { server.shutdown() }
        var idle: [Int32] = []
        defer { for fd in idle { close(fd) } }
        for _ in 0..<300 { idle.append(try Self.connect(server.port)) }
        #expect(try Self.get(server.port, "/healthz") == 200)
        #expect(server.currentUsage.connections <= 50)
    }

    @Test func slowAndSilentClientsAreClosed() async throws {
        var limits = HTTPServer.Limits()
        limits.requestTimeout = .milliseconds(500)
        limits.idleTimeout = .seconds(1)
        let server = try Self.metricsServer(limits: limits)
        defer { server.shutdown() }
        let slow = try Self.connect(server.port)
        defer { close(slow) }
        _ = Array("GET /metrics HTTP/1.1\r\nHost:".utf8).withUnsafeBytes { send(slow, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        var byte: UInt8 = 0
        #expect(recv(slow, &byte, 1, 0) == 0, "a request that never completes is closed")
        let silent = try Self.connect(server.port)
        defer { close(silent) }
        #expect(recv(silent, &byte, 1, 0) == 0, "a connection that never sends is closed")
    }

    @Test func aBridgeOutOfFileDescriptorsDoesNotSpinAndRecovers() async throws {
        let (vhost, url, dir) = try await BridgeHarness.prepareVHost()
        defer {
            try? FileManager.default.removeItem(at: dir)
            Task { try? await BridgeHarness.management("DELETE", "/api/vhosts/\(vhost)") }
        }
        let (probe, port) = try TestEnvironment.listenOnLoopback()
        close(probe)
        let bridge = TestEnvironment.builtProgram("aq-bridge").path
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/bash")
        process.arguments = ["-c", "ulimit -n 48; exec \"$0\" --amqp \"$1\" --topology \"$2\" --listen 127.0.0.1:\(port)", bridge, url, dir.path]
        process.standardError = FileHandle.nullDevice
        try process.run()
        defer { process.terminate(); process.waitUntilExit() }
        try await waitFor("aq-bridge to serve /healthz", timeout: .seconds(30)) { (try? Self.get(port, "/healthz")) == 200 }
        // More connections than the process has descriptors for.
        var held: [Int32] = []
        defer { for fd in held { close(fd) } }
        for _ in 0..<120 { if let fd = try? Self.connect(port) { held.append(fd) } }
        let before = try Self.cpuSeconds(process.processIdentifier)
        try await Task.sleep(for: .seconds(2))
        let used = try Self.cpuSeconds(process.processIdentifier) - before
        #expect(used < 0.5, "aq-bridge used \(used) s of CPU in 2 s with its descriptors exhausted: it spins")
        try await waitFor("a new client to be served", timeout: .seconds(20)) { (try? Self.get(port, "/healthz")) == 200 }
    }

    /// User plus system CPU time of a process, from /proc.
    static func cpuSeconds(_ pid: Int32) throws -> Double {
        let stat = try String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)
        guard let close = stat.lastIndex(of: ")") else { throw HarnessError(description: "bad /proc stat") }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        guard fields.count > 13, let user = Double(fields[11]), let system = Double(fields[12]) else {
            throw HarnessError(description: "bad /proc stat")
        }
        return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }
}

/// Waits for a condition, up to a deadline.
func waitFor(_ what: String, timeout: Duration = .seconds(20), _ condition: () async throws -> Bool) async throws {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if try await condition() { return }
        try await Task.sleep(for: .milliseconds(20))
    }
    Issue.record("timed out after \(timeout) waiting for \(what)")
    throw HarnessError(description: "timed out waiting for \(what)")
}
