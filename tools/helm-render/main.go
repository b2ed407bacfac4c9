// Command helm-render is a small work-alike of `helm template` for this repository's chart, so
// the chart can be checked on machines without helm (tests/helm.rs builds and runs it).
//
// It does what `helm template` does for a chart without dependencies: loads Chart.yaml and
// values.yaml, merges the -f files and --set assignments over the defaults (helm's rules: maps
// merge, a null removes a default), validates the result against values.schema.json, renders
// every template with Go's text/template, sprig and helm's own functions, and prints the
// manifests, each after a "# Source:" line. With --notes it prints the rendered NOTES.txt
// instead, as `helm install` shows it.
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
	var files, sets stringList
	name := flag.String("name", "release-name", "release name (.Release.Name)")
	namespace := flag.String("namespace", "default", "release namespace (.Release.Namespace)")
	notes := flag.Bool("notes", false, "print the rendered NOTES.txt instead of the manifests")
	flag.Var(&files, "f", "a values file; repeatable, later files win")
	flag.Var(&files, "values", "same as -f")
	flag.Var(&sets, "set", "key.path=value[,key=value]; repeatable, applied after the files")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: helm-render [--name N] [--namespace NS] [-f values.yaml]... [--set k=v]... [--notes] CHART_DIR")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	chartDir := filepath.Clean(flag.Arg(0))

	chart, err := loadChart(chartDir)
	if err != nil {
		die(err)
	}
	values, err := mergedValues(chart.defaults, files, sets)
	if err != nil {
		die(err)
	}
	if err := validateValues(chart, values); err != nil {
		die(err)
	}
	out, err := render(chart, values, release{Name: *name, Namespace: *namespace}, *notes)
	if err != nil {
		die(err)
	}
	fmt.Print(out)
}

// die prints the error the way helm does ("Error: ...") and exits 1.
func die(err error) {
	fmt.Fprintf(os.Stderr, "Error: %v\n", err)
	os.Exit(1)
}
