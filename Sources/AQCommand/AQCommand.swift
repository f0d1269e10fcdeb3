import AMQPClient
import AQTopology
import ArgumentParser
import Foundation

@main
struct AQCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "aq",
        abstract: "AsyncQueue: an HTTP task queue on RabbitMQ.",
        subcommands: [Topology.self, Tasks.self, Batches.self, Chains.self, Batch.self, DeadLetters.self, Events.self])
}

extension AQCommand {
    struct Topology: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Declare the RabbitMQ topology the AsyncQueue patterns need, from topology files.",
            discussion: """
                Files are YAML (see topology/asyncqueue.yaml). A directory means every .yaml file in it.
                Exit status: 0 success, 1 a problem (nothing applied), 2 `plan --detailed-exitcode` found a difference \
                (missing, different or extra objects).
                """,
            subcommands: [Validate.self, Plan.self, Apply.self, Export.self])
    }
}

struct FileOptions: ParsableArguments {
    @Option(name: [.short, .customLong("file")], help: "A topology file or a directory of them (repeatable; default: topology/).")
    var files: [String] = []

    var paths: [String] { self.files.isEmpty ? ["topology"] : self.files }

    func load() throws -> TopologySpec {
        do {
            let spec = try TopologyLoader.load(paths: self.paths)
            for warning in spec.checks() { printError(warning.description) }
            return spec
        } catch {
            printError(error.description)
            throw ExitCode.failure
        }
    }
}

struct BrokerOptions: ParsableArguments {
    @Option(name: .customLong("url"),
            help: ArgumentHelp("The broker's AMQP URL; its path is the virtual host. Default: $AQ_AMQP_URL, else amqp://guest:guest@127.0.0.1:5672/%2F.", valueName: "amqp-url"))
    var url: String?

    @Option(name: .customLong("management-url"),
            help: ArgumentHelp("The RabbitMQ management API (default http://AMQP-HOST:15672, or AQ_MANAGEMENT_URL); uses the AMQP URL's user and password.", valueName: "url"))
    var managementURL: String?

    func target() throws -> BrokerTarget {
        do {
            let management = self.managementURL ?? ProcessInfo.processInfo.environment["AQ_MANAGEMENT_URL"]
            let url = self.url ?? ProcessInfo.processInfo.environment["AQ_AMQP_URL"] ?? "amqp://guest:guest@127.0.0.1:5672/%2F"
            return try BrokerTarget(amqpURL: url, managementURL: management)
        } catch {
            printError("\(error)")
            throw ExitCode.failure
        }
    }
}

func printError(_ text: String) {
    FileHandle.standardError.write(Data((text + "\n").utf8))
}

extension AQCommand.Topology {
    struct Validate: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check topology files without touching a broker: every problem with its file, line and key.")

        @Argument(help: "Topology files or directories (default: topology/).")
        var files: [String] = []
        @OptionGroup var options: FileOptions

        func run() async throws {
            var options = self.options
            options.files += self.files
            let spec = try options.load()
            let topology = spec.expand()
            print("ok: \(spec.workQueues.count) work queue(s), \(topology.exchanges.count) exchanges, \(topology.queues.count) queues, \(topology.bindings.count) bindings, \(topology.policies.count) policies")
        }
    }

    struct Plan: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Compare the files with a live broker: what is missing, what differs, what is extra. Changes nothing.")

        @OptionGroup var files: FileOptions
        @OptionGroup var broker: BrokerOptions
        @Flag(help: "Exit with status 2 when the broker does not match the files: something missing, different, or extra.")
        var detailedExitcode = false

        func run() async throws {
            let spec = try self.files.load()
            let target = try self.broker.target()
            do {
                let plan = try await TopologyApplier.plan(spec, on: target)
                print(plan.description)
                if self.detailedExitcode && (!plan.isInSync || !plan.extra.isEmpty) { throw ExitCode(2) }
            } catch let exit as ExitCode {
                throw exit
            } catch {
                printError("plan failed: \(error)")
                throw ExitCode.failure
            }
        }
    }

    struct Apply: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Declare what the files define on the broker. Idempotent; never deletes unless asked.",
            discussion: "Validates the files and checks conflicts and permissions before the first change, so a bad file or a refused change leaves the broker as it was.")

        @OptionGroup var files: FileOptions
        @OptionGroup var broker: BrokerOptions
        @Flag(help: "Also delete exchanges, queues, bindings and policies on the broker that the files do not define.")
        var deleteExtra = false

        func run() async throws {
            let spec = try self.files.load()
            let target = try self.broker.target()
            do {
                let plan = try await TopologyApplier.apply(spec, on: target, deleteExtra: self.deleteExtra) { print($0) }
                let changes = plan.missing.count + plan.updates.count + (self.deleteExtra ? plan.extra.count : 0)
                if changes == 0 {
                    print("Nothing to do: the broker matches the files.")
                } else {
                    print("Applied \(changes) change(s) to virtual host '\(target.vhost)'.")
                }
                if !self.deleteExtra && !plan.extra.isEmpty {
                    print("\(plan.extra.count) object(s) on the broker are not in the files (see `aq topology plan`; --delete-extra removes them).")
                }
                // On a cluster: what is wrong now that the queues exist (leaders, replicas, nodes).
                if changes > 0, let view = try? await target.management.clusterView(vhost: target.vhost) {
                    for warning in spec.clusterChecks(desired: spec.expand(), view: view) { printError(warning.description) }
                } else {
                    for warning in plan.clusterWarnings { printError(warning.description) }
                }
            } catch {
                printError("\(error)")
                throw ExitCode.failure
            }
        }
    }

    struct Export: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print RabbitMQ definitions JSON for `rabbitmqctl import_definitions` (tunables as policies).")

        @OptionGroup var files: FileOptions
        @Option(help: "The virtual host to write into the definitions.")
        var vhost: String = "/"
        @Option(name: [.short, .long], help: "Write to this file instead of standard output.")
        var output: String?

        func run() async throws {
            let spec = try self.files.load()
            let json = try Definitions(spec.expand(), vhost: self.vhost).json()
            if let output = self.output {
                try json.write(toFile: output, atomically: true, encoding: .utf8)
            } else {
                print(json, terminator: "")
            }
        }
    }
}
