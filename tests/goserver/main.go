// Command goserver is a FastCGI application built on Go's standard library
// net/http/fcgi, used by fcgiproto's tests as a real, independent peer (Go's
// server multiplexes requests on one connection, unlike php-fpm).
//
// It serves the same handlers on a Unix socket and on a TCP address at once,
// prints "ready" on stdout once both listen, and exits when stdin reaches EOF
// (with -watch-stdin), so that it dies with the test process that started it
// even when that process is killed without running its cleanup.
//
// Only the standard library is used, so it builds offline with
// GOPROXY=off and no go.mod.
//
// What a request must carry (net/http/cgi.RequestFromMap decides this):
//   - REQUEST_METHOD;
//   - SERVER_PROTOCOL, such as "HTTP/1.1" (the request fails with status 500
//     and a message on FCGI_STDERR otherwise);
//   - REQUEST_URI, or else SCRIPT_NAME + PATH_INFO (+ "?" QUERY_STRING);
//   - CONTENT_LENGTH is optional, but must be a number when present; the body
//     is read until the end of FCGI_STDIN either way.
package main

import (
	"crypto/md5"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/fcgi"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

// pattern is the byte pattern /big repeats; the PHP docroot's big.php and the
// Python helper big_body() produce the same bytes.
const pattern = "0123456789abcdef"

func main() {
	unixPath := flag.String("unix", "", "Unix socket path to listen on")
	tcpAddr := flag.String("tcp", "", "TCP address to listen on, such as 127.0.0.1:9000")
	watchStdin := flag.Bool("watch-stdin", false, "exit when stdin reaches EOF")
	flag.Parse()
	if *unixPath == "" && *tcpAddr == "" {
		log.Fatal("give -unix, -tcp or both")
	}

	mux := http.NewServeMux()
	mux.HandleFunc("/hello", hello)
	mux.HandleFunc("/echo", echo)
	mux.HandleFunc("/big", big)
	mux.HandleFunc("/sleep", sleep)
	mux.HandleFunc("/trickle", trickle)
	mux.HandleFunc("/status", status)
	mux.HandleFunc("/params", params)

	var listeners []net.Listener
	if *unixPath != "" {
		// A socket file left by a killed predecessor would make Listen fail.
		_ = os.Remove(*unixPath)
		l, err := net.Listen("unix", *unixPath)
		if err != nil {
			log.Fatal(err)
		}
		// Any local user may connect, as with php-fpm's listen.mode = 0666.
		if err := os.Chmod(*unixPath, 0o666); err != nil {
			log.Fatal(err)
		}
		listeners = append(listeners, l)
	}
	if *tcpAddr != "" {
		l, err := net.Listen("tcp", *tcpAddr)
		if err != nil {
			log.Fatal(err)
		}
		listeners = append(listeners, l)
	}

	// Closing a Unix listener removes its socket file, so leave through here
	// on a signal instead of dying with the file still on disk.
	shutdown := func(code int) {
		for _, l := range listeners {
			_ = l.Close()
		}
		os.Exit(code)
	}
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-signals
		shutdown(0)
	}()
	if *watchStdin {
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			shutdown(0)
		}()
	}

	errs := make(chan error, len(listeners))
	for _, l := range listeners {
		go func(l net.Listener) { errs <- fcgi.Serve(l, mux) }(l)
	}
	fmt.Println("ready")
	err := <-errs
	log.Print(err)
	shutdown(1)
}

func hello(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain")
	_, _ = io.WriteString(w, "Hello, World!")
}

// echo sends the request body back, with its length and MD5 in headers.
func echo(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	sum := md5.Sum(body)
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("X-Body-Length", strconv.Itoa(len(body)))
	w.Header().Set("X-Body-Md5", hex.EncodeToString(sum[:]))
	_, _ = w.Write(body)
}

// big sends n bytes (query "n") of the repeating pattern.
func big(w http.ResponseWriter, r *http.Request) {
	n, err := strconv.ParseInt(r.URL.Query().Get("n"), 10, 64)
	if err != nil || n < 0 {
		http.Error(w, "bad n", http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("X-Body-Length", strconv.FormatInt(n, 10))
	// 4096 repetitions: 64 KiB, a multiple of the pattern's length, so the
	// pattern runs on unbroken from one chunk to the next.
	chunk := make([]byte, 0, 4096*len(pattern))
	for len(chunk) < cap(chunk) {
		chunk = append(chunk, pattern...)
	}
	for n > 0 {
		part := chunk
		if n < int64(len(part)) {
			part = part[:n]
		}
		if _, err := w.Write(part); err != nil {
			return
		}
		n -= int64(len(part))
	}
}

// sleep waits s seconds (query "s", a float, default 1) and then answers
// "slept"; it stops waiting early if the request's context ends.
func sleep(w http.ResponseWriter, r *http.Request) {
	seconds := 1.0
	if s := r.URL.Query().Get("s"); s != "" {
		var err error
		if seconds, err = strconv.ParseFloat(s, 64); err != nil {
			http.Error(w, "bad s", http.StatusBadRequest)
			return
		}
	}
	select {
	case <-time.After(time.Duration(seconds * float64(time.Second))):
	case <-r.Context().Done():
		return
	}
	_, _ = io.WriteString(w, "slept")
}

// trickle writes one byte "x" n times (query "n", default 5), flushing each
// one, with interval seconds (query "interval", default 1) between them.
func trickle(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	n, interval := 5, 1.0
	if s := q.Get("n"); s != "" {
		n, _ = strconv.Atoi(s)
	}
	if s := q.Get("interval"); s != "" {
		interval, _ = strconv.ParseFloat(s, 64)
	}
	w.Header().Set("Content-Type", "text/plain")
	flusher, _ := w.(http.Flusher)
	for i := 0; i < n; i++ {
		if i > 0 {
			time.Sleep(time.Duration(interval * float64(time.Second)))
		}
		if _, err := io.WriteString(w, "x"); err != nil {
			return
		}
		if flusher != nil {
			flusher.Flush()
		}
	}
}

// status answers with the status code given by query "code".
func status(w http.ResponseWriter, r *http.Request) {
	code, err := strconv.Atoi(r.URL.Query().Get("code"))
	if err != nil || code < 100 || code > 999 {
		http.Error(w, "bad code", http.StatusBadRequest)
		return
	}
	w.WriteHeader(code)
	_, _ = fmt.Fprintf(w, "status %d", code)
}

// params describes the request as Go saw it, as JSON. "env" holds the
// FastCGI params that net/http/cgi did not fold into the http.Request
// (fcgi.ProcessEnv), such as SCRIPT_FILENAME and custom ones.
func params(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	out := map[string]any{
		"env":            fcgi.ProcessEnv(r),
		"method":         r.Method,
		"url":            r.URL.String(),
		"path":           r.URL.Path,
		"query":          r.URL.RawQuery,
		"proto":          r.Proto,
		"host":           r.Host,
		"remote_addr":    r.RemoteAddr,
		"headers":        r.Header,
		"content_length": r.ContentLength,
		"body_length":    len(body),
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(out)
}
