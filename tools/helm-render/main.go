// Command helm-render is a small work-alike of `helm template` for this repository's chart, so
// the chart can be checked on machines without helm (tests/helm.rs builds and runs it).
//
// It does what `helm template` does for a chart without dependencies: loads Chart.yaml and
// values.yaml, merges the -f files, --set assignments and --set-file contents over the defaults
// (helm's rules: maps merge, a null removes a default), validates the result against
// values.schema.json, renders every template with Go's text/template, sprig and helm's own
// functions, and prints the manifests, each after a "# Source:" line (only those --show-only
// names, when given). With --notes it prints the rendered NOTES.txt instead, as `helm install`
// shows it.
//
// Like `helm template [NAME] CHART`, the release name and the chart may be given as arguments,
// with flags before, between or after them:
//
//	helm-render gate helm/tokengate -n apps -f values.yaml --show-only templates/sidecar.yaml
//
// Build (GOPATH mode, Debian's Go packages only, no module downloads):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o helm-render ./tools/helm-render
//
// Exit status: 0 rendered, 1 a values, schema or template error (message on stderr), 2 usage.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
)

// stringList is a repeatable flag.
type stringList []string

func (s *stringList) String() string     { return fmt.Sprint(*s) }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

func main() {
	var files, sets, setFiles, showOnly stringList
	flags := flag.NewFlagSet("helm-render", flag.ExitOnError)
	name := flags.String("name", "", "release name (.Release.Name); or the first argument")
	namespace := flags.String("namespace", "default", "release namespace (.Release.Namespace)")
	flags.StringVar(namespace, "n", "default", "same as --namespace")
	notes := flags.Bool("notes", false, "print the rendered NOTES.txt instead of the manifests")
	flags.Var(&files, "f", "a values file; repeatable, later files win")
	flags.Var(&files, "values", "same as -f")
	flags.Var(&sets, "set", "key.path=value[,key=value]; repeatable, applied after the files")
	flags.Var(&setFiles, "set-file", "key.path=FILE[,key=FILE]: the file's contents as a string value; applied after --set")
	flags.Var(&showOnly, "show-only", "only the manifests of this template (templates/x.yaml, a glob); repeatable")
	flags.Var(&showOnly, "s", "same as --show-only")
	flags.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: helm-render [NAME] CHART_DIR [-n NS] [-f values.yaml]... [--set k=v]... [--set-file k=FILE]... [--show-only templates/x.yaml]... [--notes]")
		flags.PrintDefaults()
	}
	args := parseInterspersed(flags, os.Args[1:])
	switch {
	case len(args) == 2 && *name == "":
		*name = args[0]
		args = args[1:]
	case len(args) != 1:
		flags.Usage()
		os.Exit(2)
	}
	if *name == "" {
		*name = "release-name"
	}
	chartDir := filepath.Clean(args[0])

	chart, err := loadChart(chartDir)
	if err != nil {
		die(err)
	}
	values, err := mergedValues(chart.defaults, files, sets, setFiles)
	if err != nil {
		die(err)
	}
	if err := validateValues(chart, values); err != nil {
		die(err)
	}
	out, err := render(chart, values, release{Name: *name, Namespace: *namespace}, *notes, showOnly)
	if err != nil {
		die(err)
	}
	fmt.Print(out)
}

// parseInterspersed parses flags anywhere among the arguments, as helm's command line does, and
// returns the arguments that are not flags.
func parseInterspersed(flags *flag.FlagSet, args []string) []string {
	var positional []string
	for {
		// ExitOnError: a bad flag ends the program with status 2.
		_ = flags.Parse(args)
		rest := flags.Args()
		if len(rest) == 0 {
			return positional
		}
		positional = append(positional, rest[0])
		args = rest[1:]
	}
}

// die prints the error the way helm does ("Error: ...") and exits 1.
func die(err error) {
	fmt.Fprintf(os.Stderr, "Error: %v\n", err)
	os.Exit(1)
}
