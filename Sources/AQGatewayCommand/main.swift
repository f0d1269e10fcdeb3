import AQBridge
import AQGateway
import ArgumentParser
import Foundation
import Logging

@main
struct GatewayCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "aq-gateway",
        abstract: "AsyncQueue over HTTP: POST /v1/tasks, /v1/batches, /v1/chains (202 once the broker confirmed).",
        discussion: """
            Configuration, later sources winning: defaults, --config FILE (YAML), the environment (AQ_AMQP_URL, \
            AQ_MANAGEMENT_URL, AQ_TOPOLOGY, AQ_GATEWAY_LISTEN, AQ_GATEWAY_TOKENS, AQ_LOG_LEVEL), flags. See README.md, "HTTP gateway".
            """,
        subcommands: [Serve.self, HashToken.self],
        defaultSubcommand: Serve.self)

    struct Serve: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Run the gateway (the default).")

        @Option(help: "A YAML configuration file.")
        var config: String?
        @Option(help: "host:port to listen on (port 0: any free port).")
        var listen: String?
        @Option(name: .customLong("amqp"), help: ArgumentHelp("The broker's AMQP URL (default $AQ_AMQP_URL).", valueName: "url"))
        var amqpUrl: String?
        @Option(help: "RabbitMQ's management API (the dashboard's queue numbers).")
        var managementUrl: String?
        @Option(help: "Topology files or directories (repeatable; default topology/).")
        var topology: [String] = []

        func run() async throws {
            // A closed peer socket is an error to handle, not a silent death (see aq-bridge).
            signal(SIGPIPE, SIG_IGN)
            var configuration = GatewayConfiguration()
            do {
                if let config { try configuration.apply(file: config) }
                try configuration.apply(environment: ProcessInfo.processInfo.environment)
            } catch {
                FileHandle.standardError.write(Data("aq-gateway: \(error)\n".utf8))
                throw ExitCode(2)
            }
            if let listen { configuration.listen = listen }
            if let amqpUrl { configuration.amqpURL = amqpUrl }
            if let managementUrl { configuration.managementURL = managementUrl }
            if !topology.isEmpty { configuration.topology = topology }
            let level = Logger.Level(rawValue: configuration.logLevel) ?? .info
            // The bridge's logfmt lines (one format for operators; and Hummingbird's request id,
            // set on every request's logger, is a dictionary write here, not a re-rendering).
            LoggingSystem.bootstrap { label in LogfmtHandler(label: label, level: level) }
            let logger = Logger(label: "aq-gateway")
            do {
                try await GatewayServer.run(configuration: configuration, logger: logger)
            } catch {
                FileHandle.standardError.write(Data("aq-gateway: \(error)\n".utf8))
                throw ExitCode.failure
            }
        }
    }

    struct HashToken: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "hash-token",
            abstract: "Print a new random token and the SHA-256 to configure (or hash the token given on standard input).")

        @Flag(help: "Read the token from standard input instead of making one.")
        var stdin = false

        func run() throws {
            let token: String
            if stdin {
                token = (readLine(strippingNewline: true) ?? "").trimmingCharacters(in: .whitespaces)
            } else {
                var bytes = [UInt8](repeating: 0, count: 24)
                var generator = SystemRandomNumberGenerator()
                for i in bytes.indices { bytes[i] = generator.next() }
                token = "aqt_" + TokenVerifier.hex(bytes)
                print("token:  \(token)")
            }
            print("sha256: \(TokenVerifier.hex(TokenVerifier.sha256(Array(token.utf8))))")
        }
    }
}
