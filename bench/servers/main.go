// A tiny Go net/http server for bench/run-servers.sh: 200 text on GET /.
// Serves on 127.0.0.1:$PORT when PORT is set, else on the inherited fd 3
// (socket activation). Sends READY=1 to $NOTIFY_SOCKET (a unixgram socket)
// once it serves, and on SIGTERM calls srv.Shutdown(ctx), Go's documented
// graceful shutdown (it closes idle keep-alive connections at once).
package main

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func notify(state string) {
	addr := os.Getenv("NOTIFY_SOCKET")
	if addr == "" {
		return
	}
	if addr[0] == '@' {
		addr = "\x00" + addr[1:]
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		log.Printf("notify: %v", err)
		return
	}
	defer conn.Close()
	if _, err := conn.Write([]byte(state)); err != nil {
		log.Printf("notify: %v", err)
	}
}

func main() {
	var ln net.Listener
	var err error
	if port := os.Getenv("PORT"); port != "" {
		ln, err = net.Listen("tcp", "127.0.0.1:"+port)
	} else {
		f := os.NewFile(3, "listener")
		ln, err = net.FileListener(f)
		f.Close()
	}
	if err != nil {
		log.Fatalf("listener: %v", err)
	}

	body := fmt.Sprintf("go generation %s\n", os.Getenv("BATON_GENERATION"))
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.Write([]byte(body))
	})
	srv := &http.Server{Handler: mux}

	done := make(chan struct{})
	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		<-sig
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			log.Printf("shutdown: %v", err)
		}
		close(done)
	}()

	// The listener already listens: connections queue until Serve accepts.
	notify("READY=1")
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Fatalf("serve: %v", err)
	}
	<-done
}
