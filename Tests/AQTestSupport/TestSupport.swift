import Foundation

/// Shared by the test targets: where the repository is, which broker to use, and how to run
/// rabbitmqctl and other programs.
public enum TestEnvironment {
    public static let repositoryRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent()

    /// The test process ignores SIGPIPE, as aq-bridge and aq-gateway do: a write to a peer that
    /// went away (a bridge killed with -9 mid-answer) is an error to see, not a silent end of the
    /// whole run (swift test then reports only "signal code 13").
    public static let ignoresSIGPIPE: Void = { _ = signal(SIGPIPE, SIG_IGN) }()

    /// `AQ_TEST_AMQP_URL`, or the private node `scripts/test` starts.
    public static var amqpURL: String {
        _ = Self.ignoresSIGPIPE
        if let url = ProcessInfo.processInfo.environment["AQ_TEST_AMQP_URL"], !url.isEmpty { return url }
        let port = ProcessInfo.processInfo.environment["AQ_BROKER_PORT"] ?? "27700"
        return "amqp://guest:guest@127.0.0.1:\(port)/%2F"
    }

    /// `AQ_TEST_MANAGEMENT_URL`, or the private node's management API.
    public static var managementURL: String {
        if let url = ProcessInfo.processInfo.environment["AQ_TEST_MANAGEMENT_URL"], !url.isEmpty { return url }
        let port = Int(ProcessInfo.processInfo.environment["AQ_BROKER_PORT"] ?? "27700").map { $0 + 1 } ?? 27701
        return "http://127.0.0.1:\(port)"
    }

    /// A program built beside the tests (`aq`, `aq-bridge`).
    public static func builtProgram(_ name: String) -> URL {
        for dir in [Bundle.main.bundleURL, Bundle.main.bundleURL.deletingLastPathComponent(), repositoryRoot.appendingPathComponent(".build/debug")] {
            let url = dir.appendingPathComponent(name)
            if FileManager.default.isExecutableFile(atPath: url.path) { return url }
        }
        return repositoryRoot.appendingPathComponent(".build/debug/\(name)")
    }

    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    /// A listening TCP socket on 127.0.0.1 with a free port (the kernel completes connections to
    /// it even before anyone accepts them).
    public static func listenOnLoopback() throws -> (fd: Int32, port: Int) {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard fd >= 0, bound == 0, listen(fd, 16) == 0 else {
            if fd >= 0 { close(fd) }
            throw Failure(description: "cannot listen on 127.0.0.1")
        }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        return (fd, Int(UInt16(bigEndian: address.sin_port)))
    }

    /// Runs a program to its end: its status, standard output and standard error.
    public static func run(_ executable: URL, _ arguments: [String], environment: [String: String] = [:],
                           directory: URL? = nil, input: String? = nil) throws -> (status: Int32, out: String, err: String) {
        let process = Process()
        process.executableURL = executable
        process.arguments = arguments
        if let directory { process.currentDirectoryURL = directory }
        process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        let stdin = Pipe()
        if input != nil { process.standardInput = stdin }
        try process.run()
        if let input {
            stdin.fileHandleForWriting.write(Data(input.utf8))
            try stdin.fileHandleForWriting.close()
        }
        let o = out.fileHandleForReading.readDataToEndOfFile(), e = err.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: o, as: UTF8.self), String(decoding: e, as: UTF8.self))
    }

    /// Runs a program to its end with `posix_spawn` and `waitpid`, its output appended to `log`:
    /// for scripts that leave daemons behind (`scripts/cluster restart`), whose exit Foundation's
    /// `Process.waitUntilExit` was seen to miss (the script a zombie, the wait endless).
    public static func spawnAndWait(_ executable: String, _ arguments: [String], log: String = "/dev/null") async throws -> Int32 {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, log, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        let argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { for pointer in argv { free(pointer) } }
        var pid: pid_t = 0
        let spawned = posix_spawn(&pid, executable, &actions, nil, argv, environ)
        guard spawned == 0 else { throw Failure(description: "cannot run \(executable): \(String(cString: strerror(spawned)))") }
        let child = pid
        return await withCheckedContinuation { (continuation: CheckedContinuation<Int32, Never>) in
            Thread.detachNewThread {
                var status: Int32 = 0
                while waitpid(child, &status, 0) < 0, errno == EINTR {}
                // WIFEXITED / WEXITSTATUS, which Swift does not import.
                continuation.resume(returning: status & 0x7f == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f))
            }
        }
    }

    /// rabbitmqctl against the test broker (`AQ_TEST_RABBITMQCTL`, default `scripts/broker ctl`).
    @discardableResult
    public static func rabbitmqctl(_ arguments: String...) throws -> String {
        try self.rabbitmqctl(arguments: arguments)
    }

    @discardableResult
    public static func rabbitmqctl(arguments: [String]) throws -> String {
        let command = ProcessInfo.processInfo.environment["AQ_TEST_RABBITMQCTL"].map { $0.split(separator: " ").map(String.init) }
            ?? [self.repositoryRoot.appendingPathComponent("scripts/broker").path, "ctl"]
        let result = try self.run(URL(fileURLWithPath: command[0]), Array(command.dropFirst()) + arguments)
        guard result.status == 0 else {
            throw Failure(description: "rabbitmqctl \(arguments.joined(separator: " ")) failed: \(result.out)\(result.err)")
        }
        return result.out
    }
}
